"""Metrics by hand: macro-F1 over the classes present in truth or prediction, per-class F1 indexed by class,
balanced accuracy (mean per-class recall) next to plain accuracy."""
import numpy as np
import pytest
from sklearn.metrics import f1_score

from wbc.core.metrics import macro_f1, per_class_f1, summary


@pytest.mark.parametrize("y_true, y_pred, expected", [
    # class 2 is predicted but never true: it scores 0 and counts (F1 1, 2/3, 0); class 3 is nowhere: left out
    ([0, 0, 1, 1], [0, 0, 1, 2], (1 + 2 / 3 + 0) / 3),
    # class 3 is true but never predicted: it scores 0 and counts (F1 0.8, 1, 0)
    ([0, 0, 1, 1, 3], [0, 0, 1, 1, 0], (0.8 + 1 + 0) / 3),
])
def test_macro_f1_counts_classes_seen_in_truth_or_prediction(y_true, y_pred, expected):
    y_true, y_pred = np.array(y_true), np.array(y_pred)
    assert macro_f1(y_true, y_pred, 4) == pytest.approx(expected)


def test_macro_f1_equals_sklearn_on_random_labels_weights_and_codes():
    """The bincount macro-F1 is sklearn's f1_score over the classes seen, weighted or not, for any label codes."""
    rng = np.random.default_rng(0)
    for t in range(300):
        n, k = int(rng.integers(1, 60)), int(rng.integers(1, 8))
        y, p = rng.integers(0, k, n), rng.integers(0, k, n)
        w = None if t % 2 else np.where(rng.random(n) < 0.2, 0.0, rng.random(n) * 3)
        if w is not None:
            w[0] = 1.0  # sklearn refuses all-zero weights
        ref = f1_score(y, p, labels=np.unique(np.concatenate([y, p])), average="macro", zero_division=0,
                       sample_weight=w)
        assert macro_f1(y, p, k, w) == pytest.approx(ref, abs=1e-12)
        codes = np.array(list("ABCDEFGH"))
        assert macro_f1(y - 1, p - 1, k, w) == macro_f1(codes[y], codes[p], k, w) == pytest.approx(ref, abs=1e-12)
    assert macro_f1(np.array([], int), np.array([], int), 3) == 0.0
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        macro_f1(np.zeros(3, int), np.zeros(2, int), 3)


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
