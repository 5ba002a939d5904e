import json

import pandas as pd
import pytest

from wbc.errors import WBCError
from wbc.submit import validate_submission, write_submission

CLASSES = ["A", "B", "C"]


def frame(ids, labels):
    return pd.DataFrame({"ID": ids, "labels": labels})


@pytest.mark.parametrize("ids,labels,msg", [
    (["1", "2"], ["A", "B"], "1 test IDs missing, e.g. 3"),
    (["1", "2", "3", "4"], ["A", "B", "C", "A"], ":5: ID 4 is not in the test split"),
    (["1", "2", "2", "3"], ["A", "B", "B", "C"], ":4: duplicate ID 2"),
    (["1", "2", "3"], ["A", "B", "Z"], ":4: label 'Z' is not a class code"),
])
def test_validation_refuses(ids, labels, msg):
    with pytest.raises(WBCError, match=msg):
        validate_submission(frame(ids, labels), ["1", "2", "3"], CLASSES, "sub.csv")


def test_wrong_columns():
    with pytest.raises(WBCError, match="columns must be ID,labels"):
        validate_submission(pd.DataFrame({"id": ["1"], "label": ["A"]}), ["1"], CLASSES)


def test_write_in_test_order_with_sidecar(tmp_path):
    (tmp_path / "phase2_test.csv").write_text("ID,labels\n3,\n1,\n2,\n")
    path = write_submission(tmp_path, ["1", "2", "3"], ["A", "B", "C"], "x", CLASSES, {"cv_macro_f1": 0.5},
                            out_dir=tmp_path / "subs")
    df = pd.read_csv(path, dtype=str)
    assert list(df["ID"]) == ["3", "1", "2"] and list(df["labels"]) == ["C", "A", "B"]
    side = json.loads((tmp_path / "subs" / "x.json").read_text())
    assert side["cv_macro_f1"] == 0.5 and side["predicted_counts"] == {"A": 1, "B": 1, "C": 1}
    with pytest.raises(WBCError):
        write_submission(tmp_path, ["1", "2"], ["A", "B"], "bad", CLASSES, {}, out_dir=tmp_path / "subs")
    assert not (tmp_path / "subs" / "bad.csv").exists()


def test_check_file_validates_an_existing_submission(tmp_path):
    from wbc.submit import check_file

    (tmp_path / "phase2_test.csv").write_text("ID,labels\n3,\n1,\n2,\n")
    good, short = tmp_path / "good.csv", tmp_path / "short.csv"
    good.write_text("ID,labels\n1,A\n2,B\n3,C\n")
    short.write_text("ID,labels\n1,A\n2,B\n")
    check_file(good, tmp_path, CLASSES)
    with pytest.raises(WBCError, match="short.csv: 1 test IDs missing, e.g. 3"):
        check_file(short, tmp_path, CLASSES)
    with pytest.raises(WBCError, match="submission not found"):
        check_file(tmp_path / "none.csv", tmp_path, CLASSES)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from wbc.io import atomic_path, write_text

    p = tmp_path / "subs" / "x.csv"
    write_text(p, "ID,labels\n1,A\n")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("ID,lab")  # killed half-way
            raise RuntimeError("killed")
    assert p.read_text() == "ID,labels\n1,A\n" and [q.name for q in p.parent.iterdir()] == ["x.csv"]
