"""benchmarks/quality.py: its figure (off-scale perplexities move to the top edge and are reported, others
stay) and its variant rows (settings the tool accepts)."""

import importlib.util
import json
import sys
from pathlib import Path

from multipruner.search.calibration import CalibrationSettings
from multipruner.search.loop import SearchSettings

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


def test_figure_is_written_from_the_committed_cells(tmp_path):
    cells = list(
        json.loads((Path(__file__).resolve().parents[1] / "docs" / "quality.json").read_text()).values()
    )
    out = tmp_path / "figure.png"
    quality.plot(cells, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
