"""benchmarks/quality.py: its figure (one line per method at the cells' perplexities; off-scale ones move to
the top edge and are reported, others stay) and its variant rows (settings the tool accepts)."""

import importlib.util
import json
import sys
from pathlib import Path

import matplotlib.image
import pytest

from multipruner.search.calibration import CalibrationSettings
from multipruner.search.settings import SearchSettings

_spec = importlib.util.spec_from_file_location(
    "quality_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
)
quality = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = quality  # a dataclass looks its module up there
_spec.loader.exec_module(quality)


def test_clip_off_scale_moves_only_points_above_the_ceiling():
    points = [(0.0, 20.0), (10.0, 1999.0), (20.0, 8.0e10)]
    drawn, off_scale = quality.clip_off_scale(points, ceiling=2000.0)
    assert drawn == [(0.0, 20.0), (10.0, 1999.0), (20.0, 2000.0)]
    assert off_scale == [(20.0, 8.0e10)]


def test_clip_off_scale_without_a_dense_row_draws_everything():
    points = [(10.0, 5.0e12)]
    assert quality.clip_off_scale(points, ceiling=None) == (points, [])


COMMITTED_CELLS = list(
    json.loads((Path(__file__).resolve().parents[1] / "docs" / "quality.json").read_text()).values()
)


def _ppl(cell: dict, task: str) -> float:
    return cell["eval"]["tasks"][task]["ppl"]["value"]


def test_figure_draws_each_committed_cell_at_its_perplexity():
    models = sorted({c["model"] for c in COMMITTED_CELLS})
    fig = quality.build_figure(COMMITTED_CELLS)
    axes = fig.get_axes()
    assert len(axes) == len(models) * len(quality.PPL_TASKS)  # one panel per model and task, row by row
    for index, ax in enumerate(axes):
        model = models[index // len(quality.PPL_TASKS)]
        task = quality.PPL_TASKS[index % len(quality.PPL_TASKS)]
        assert ax.get_title() == f"{model}: {quality.LABELS[task]} test"
        assert ax.get_xlabel() == "parameters removed (%)"
        assert ax.get_yscale() == "log"
        cells = [c for c in COMMITTED_CELLS if c["model"] == model]
        dense = next(_ppl(c, task) for c in cells if c["method"] == "dense")
        ceiling = dense * quality.OFF_SCALE_FACTOR
        # the off-scale markers are unlabelled lines ("_child..."); each method is one labelled line
        lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        assert set(lines) == {c["method"] for c in cells} - {"dense"}
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)
        off_scale = []
        for method, line in lines.items():
            expected = [(0.0, dense)] + sorted(
                (c["ratio"], _ppl(c, task)) for c in cells if c["method"] == method
            )
            xs, ys = line.get_data()
            assert list(xs) == pytest.approx([x for x, _ in expected]), (model, task, method)
            assert list(ys) == pytest.approx([min(y, ceiling) for _, y in expected]), (model, task, method)
            off_scale += [f"{y:.1e}" for _, y in expected if y > ceiling]
        # a perplexity past the ceiling is drawn on it and its value written beside it
        assert sorted(text.get_text() for text in ax.texts) == sorted(off_scale)
    # the committed cells hold one such model (ShortGPT on Gemma-3-270M at 20 %): the clipping is exercised
    assert any(ax.texts for ax in axes)


def test_figure_png_has_the_figure_size_and_is_not_blank(tmp_path):
    out = tmp_path / "figure.png"
    quality.plot(COMMITTED_CELLS, out)
    pixels = matplotlib.image.imread(out)
    fig = quality.build_figure(COMMITTED_CELLS)
    width, height = fig.get_size_inches() * fig.dpi
    assert pixels.shape[:2] == (round(height), round(width))
    not_white = (pixels[..., :3] < 0.95).any(axis=-1)
    assert 0.02 < not_white.mean() < 0.5  # axes, lines and text drawn on a mostly white page


def test_every_variant_row_is_settings_the_tool_accepts():
    for name, variant in quality.VARIANTS.items():
        assert variant.method in quality.METHODS, name
        assert name in quality.ROW_ORDER, name
        calibration = CalibrationSettings(**variant.calibration)
        search = SearchSettings(method=variant.method, target_ratio=10.0, **variant.search)
        for field, value in variant.calibration.items():
            assert getattr(calibration, field) == value
        for field, value in variant.search.items():
            assert getattr(search, field) == value
