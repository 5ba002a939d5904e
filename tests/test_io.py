"""The probability-file contract (`wbc.core.io.Probs`): alignment by ID, labels, folds, and the CSV round trip."""
import numpy as np
import pandas as pd
import pytest

from wbc.core.errors import WBCError
from wbc.core.io import Probs, load_probs, save_probs

CLASSES = ["BA", "EO", "LY"]


def _probs():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])
    return Probs(["a", "b", "c", "d"], p, CLASSES, [0, 1, 1, 0], ["BA", "LY", None, "XX"])


def test_align_reorders_rows_and_keeps_folds_and_labels():
    p = _probs().align(["d", "b", "a"])
    assert list(p.ids) == ["d", "b", "a"]
    assert np.allclose(p.probs[:, 2], [0.4, 0.1, 0.1])  # rows follow their IDs
    assert list(p.folds) == [0, 1, 0] and list(p.labels) == ["XX", "LY", "BA"]
    with pytest.raises(WBCError, match="missing from predictions, e.g. z"):
        _probs().align(["a", "z"])


def test_unknown_and_missing_labels_index_as_minus_one():
    p = _probs()
    assert list(p.labels) == ["BA", "LY", "", "XX"]  # a missing label is '', never 'nan' / 'None'
    assert list(p.label_index()) == [0, 2, -1, -1]
    assert list(Probs(["a"], [[1.0, 0, 0]], CLASSES).label_index()) == [-1]


def test_save_load_round_trip_keeps_every_column(tmp_path):
    save_probs(tmp_path / "p.csv", _probs())
    assert list(pd.read_csv(tmp_path / "p.csv").columns) == ["ID", "fold", "labels", "prob_BA", "prob_EO", "prob_LY"]
    q = load_probs(tmp_path / "p.csv")
    assert list(q.ids) == ["a", "b", "c", "d"] and q.classes == CLASSES
    assert list(q.folds) == [0, 1, 1, 0] and list(q.labels) == ["BA", "LY", "", "XX"]
    assert np.allclose(q.probs, _probs().probs)
    save_probs(tmp_path / "t.csv", Probs(["007", "10"], [[1.0, 0, 0], [0, 1.0, 0]], CLASSES))  # test: no fold/labels
    t = load_probs(tmp_path / "t.csv")
    assert list(t.ids) == ["007", "10"] and t.folds is None and t.labels is None  # IDs stay strings


def test_probabilities_must_match_ids_and_classes():
    with pytest.raises(WBCError, match=r"shape \(2, 2\), expected \(2, 3\)"):
        Probs(["a", "b"], np.ones((2, 2)) / 2, CLASSES)


@pytest.mark.parametrize("text,msg", [
    ("ID,fold,prob_BA,prob_EO,prob_LY\na,0,1,0,0\nb,0,,0.5,0.5\n", "p.csv:3: prob_BA is '', not a finite"),
    ("ID,fold,prob_BA,prob_EO,prob_LY\na,0,1,0,0\nb,0,0.5,NaN,0.5\n", "p.csv:3: prob_EO is 'NaN', not a finite"),
    ("ID,fold,prob_BA,prob_EO,prob_LY\na,0,1,0,x\n", "p.csv:2: prob_LY is 'x', not a finite"),
    ("ID,fold,prob_BA,prob_EO,prob_LY\na,0,1,0,0\nb,,1,0,0\n", "p.csv:3: fold is '', not a fold number"),
    ("", "p.csv: not a readable CSV"),
])
def test_load_probs_refuses_bad_cells_naming_file_and_row(tmp_path, text, msg):
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(WBCError, match=msg):
        load_probs(tmp_path / "p.csv")


def test_load_probs_requires_the_columns_the_caller_needs(tmp_path):
    save_probs(tmp_path / "p.csv", Probs(["a"], [[1.0, 0, 0]], CLASSES))
    assert load_probs(tmp_path / "p.csv").folds is None
    with pytest.raises(WBCError, match=r"p.csv:1: missing column\(s\) fold, labels \(found ID, prob_BA"):
        load_probs(tmp_path / "p.csv", need=("fold", "labels"))
