"""benchmarks/quality.py's figure: off-scale perplexities move to the top edge and are reported, others stay."""

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "quality_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
)
quality = importlib.util.module_from_spec(_spec)
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
