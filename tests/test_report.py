"""Ensemble report: per-class F1 per step keyed by its class, and the summary's nested and submitted columns."""
import numpy as np
import pytest

from wbc.core.metrics import macro_f1
from wbc.s5_ensemble import report as R


def test_step_scores_per_class_f1_belong_to_their_class():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    preds = {"member": np.array([0, 0, 0, 0, 1, 1, 1, 1]), "blend": y.copy()}
    sc = R.step_scores(y, preds, ["A", "B", "C"])
    assert list(sc) == ["member", "blend"]
    assert sc["member"]["per_class_f1"] == pytest.approx({"A": 1.0, "B": 2 / 3, "C": 0.0})
    assert sc["member"]["macro_f1"] == pytest.approx(macro_f1(y, preds["member"], 3))
    assert sc["blend"]["macro_f1"] == 1.0 and set(sc["blend"]["per_class_f1"].values()) == {1.0}


def test_summary_shows_nested_scores_beside_their_step_and_marks_the_submitted_one(monkeypatch):
    tables = []
    monkeypatch.setattr(R, "print_table", lambda title, cols, rows, *a: tables.append((cols, rows)))
    f = lambda v: {"macro_f1": v}  # noqa: E731
    R.print_summary({"final_step": "tuned", "scores": {
        "oof": {"m1": f(0.6), "blend": f(0.7), "tuned": f(0.8)}, "eval": {"tuned": f(0.75)},
        "oof_nested_blend": 0.68, "oof_nested": 0.72}})
    cols, rows = tables[0]
    assert cols == ["step", "OOF", "OOF nested", "eval"]
    assert rows == [["m1", 0.6, "", ""], ["blend", 0.7, 0.68, ""], ["tuned (submitted)", 0.8, 0.72, 0.75]]
