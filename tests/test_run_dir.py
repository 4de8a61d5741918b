"""The run directory survives kills: a torn last step line is cut before the next append, outputs
follow the umask, and leftovers of a killed write are removed by the next run."""

from __future__ import annotations

import json
import os
import stat

import pytest
from conftest import prune_args

from multipruner.cli import main
from multipruner.run.run_dir import ModelSource, RunDirectory, RunDirError
from multipruner.search.settings import SearchSettings


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_torn_last_line_is_cut_before_the_next_record(tmp_path):
    run = RunDirectory(tmp_path)
    run.append_record({"step": 0, "stage": "dense"})
    run.append_record({"step": 1, "stage": "block"})
    with open(run.steps_file, "a") as handle:
        handle.write('{"step": 2, "stage": "blo')  # killed mid-write
    run.append_record({"step": 2, "stage": "block"})
    lines = run.steps_file.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]  # every line parses
    run.append_record({"step": 3, "stage": "mlp_width"})
    assert len(RunDirectory(tmp_path).step_records()) == 3  # dense record first, then 3 steps


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_follow_the_umask(tiny_model_dir, calibration_txt, tmp_path, umask_022):
    run = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--max-steps", "1", "--extract")) == 0
    for name in ("run.json", "calibration.safetensors", "plan.json", "steps.jsonl"):
        assert _mode(run / name) == 0o644, name
    assert _mode(run / "model") == 0o755
    assert _mode(run / "model" / "model.safetensors") == 0o644


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tiny_model_dir, calibration_txt, tmp_path):
    run = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--max-steps", "1")) == 0
    torn_plan = run / ".plan.json.k1ll3d.tmp"
    torn_plan.write_text("{")
    partial_model = run / ".model.partial-k1ll3d"
    partial_model.mkdir()
    (partial_model / "config.json").write_text("{}")
    assert (
        main(prune_args(tiny_model_dir, run, calibration_txt, "--max-steps", "2", "--extract", "--resume"))
        == 0
    )
    assert not torn_plan.exists() and not partial_model.exists()
    assert (run / "model" / "config.json").is_file()


def test_a_run_from_before_format_2_is_refused_with_how_to_start_anew(
    tiny_model_dir, calibration_txt, tmp_path, capsys
):
    """Old run directories are not migrated: resuming or reporting one says, in one line, to start anew."""
    run = tmp_path / "run"
    assert main(prune_args(tiny_model_dir, run, calibration_txt, "--max-steps", "1")) == 0
    settings = json.loads((run / "run.json").read_text())["settings"]
    flat = {**settings["model"], **settings["calibration"], "target_ratio": 30.0}  # the old run.json
    (run / "run.json").write_text(json.dumps(flat))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    for argv in (prune_args(tiny_model_dir, run, calibration_txt, "--resume"), ["report", str(run)]):
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{run / 'run.json'} is from a multipruner older than multipruner-run/2" in err
        assert "rerun the prune without --resume into a new directory" in err
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing migrated, nothing reported


def test_resuming_compares_settings_and_a_setting_the_run_predates_counts_as_what_runs_did_then(tmp_path):
    run, source = RunDirectory(tmp_path / "run"), ModelSource("m")
    run.start_or_resume(False, source, {"search": SearchSettings(channel_importance="l1", target_ratio=20.0)})
    assert RunDirectory(run.path).manifest().settings["search"]["target_ratio"] == 20.0
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        run.start_or_resume(False, source, {"search": SearchSettings()})
    stored = run.manifest()
    del stored.settings["search"]["channel_importance"]  # a run made before the setting existed: by L1
    run.write_manifest(stored)
    old_way = SearchSettings(channel_importance="l1", target_ratio=20.0, max_steps=3)  # not a result setting
    run.start_or_resume(True, source, {"search": old_way})
    with pytest.raises(RunDirError, match=r"settings differ \(channel_importance: 'l1' -> 'activations'\)"):
        run.start_or_resume(True, source, {"search": SearchSettings(target_ratio=20.0)})
