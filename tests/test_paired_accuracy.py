"""benchmarks/paired_accuracy.py: paired differences and their standard errors against hand calculations."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "paired_accuracy_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "paired_accuracy.py"
)
paired_accuracy = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = paired_accuracy
_spec.loader.exec_module(paired_accuracy)


def test_paired_differences_match_documents_not_positions():
    first = {"boolq": {0: 1.0, 1: 0.0, 2: 1.0}}
    other = {"boolq": {2: 0.0, 0: 1.0, 1: 1.0}}  # another order: pairing must go by document id
    assert paired_accuracy.paired_samples(first, other) == {"boolq": [0.0, 1.0, -1.0]}


def test_summary_against_a_hand_calculation():
    samples = {"a": [1.0, 0.0, 1.0, 1.0], "b": [0.0, 0.0, 1.0, 0.0]}
    out = paired_accuracy.summary(samples)
    # a: mean 0.75, sample variance (3 * 0.0625 + 0.5625) / 3 = 0.25, error sqrt(0.25 / 4) = 0.25
    # b: mean 0.25, the same error by symmetry
    assert out["tasks"]["a"] == pytest.approx((0.75, 0.25))
    assert out["tasks"]["b"] == pytest.approx((0.25, 0.25))
    assert out["mean"] == pytest.approx((0.5, math.sqrt(0.25**2 + 0.25**2) / 2))


def test_identical_models_differ_by_zero_with_zero_error():
    scores = {"piqa": {0: 1.0, 1: 0.0, 2: 1.0}, "arc_easy": {5: 0.0, 7: 1.0}}
    out = paired_accuracy.summary(paired_accuracy.paired_samples(scores, scores))
    assert out["mean"] == (0.0, 0.0)
