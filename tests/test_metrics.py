"""Metrics by hand: macro-F1 over the classes present in truth or prediction, per-class F1 indexed by class,
balanced accuracy (mean per-class recall) next to plain accuracy."""
import numpy as np
import pytest

from wbc.ensemble.tune import macro_f1_fast
from wbc.metrics import macro_f1, per_class_f1, summary


@pytest.mark.parametrize("y_true, y_pred, expected", [
    # class 2 is predicted but never true: it scores 0 and counts (F1 1, 2/3, 0); class 3 is nowhere: left out
    ([0, 0, 1, 1], [0, 0, 1, 2], (1 + 2 / 3 + 0) / 3),
    # class 3 is true but never predicted: it scores 0 and counts (F1 0.8, 1, 0)
    ([0, 0, 1, 1, 3], [0, 0, 1, 1, 0], (0.8 + 1 + 0) / 3),
])
def test_macro_f1_counts_classes_seen_in_truth_or_prediction(y_true, y_pred, expected):
    y_true, y_pred = np.array(y_true), np.array(y_pred)
    assert macro_f1(y_true, y_pred, 4) == pytest.approx(expected)
    assert macro_f1_fast(y_true, y_pred, 4) == pytest.approx(expected)  # the tuner's scorer agrees


def test_per_class_f1_is_indexed_by_class():
    # classes 1 and 3 are nowhere: they keep their slots, with F1 0
    np.testing.assert_allclose(per_class_f1([0, 0, 2, 2], [0, 2, 2, 2], 4), [2 / 3, 0, 0.8, 0])


def test_summary_balanced_accuracy_and_counts():
    s = summary(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]), ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["balanced_accuracy"] == pytest.approx(0.5)  # recall 1 on a, 0 on b
    assert s["macro_f1"] == pytest.approx((6 / 7 + 0) / 2)
    assert s["per_class_f1"] == pytest.approx({"a": 6 / 7, "b": 0.0, "c": 0.0})
    assert s["support"] == {"a": 3, "b": 1, "c": 0} and s["predicted"] == {"a": 4, "b": 0, "c": 0} and s["n"] == 4
