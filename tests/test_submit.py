import json
import re

import pandas as pd
import pytest

from wbc.core.errors import WBCError
from wbc.s1_data.submission import validate_submission, write_submission

CLASSES = ["A", "B", "C"]


def frame(ids, labels):
    return pd.DataFrame({"ID": ids, "labels": labels})


@pytest.mark.parametrize("ids,labels,msg", [
    (["1", "2"], ["A", "B"], "1 test IDs missing, e.g. '3'"),
    (["1", "2", "3", "4"], ["A", "B", "C", "A"], ":5: ID '4' is not in the test split"),
    (["1", "2", "2", "3"], ["A", "B", "B", "C"], ":4: duplicate ID '2'"),
    (["1", "2", "3 "], ["A", "B", "C"], ":4: ID '3 ' is not in the test split"),  # quoted: the space shows
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
    from wbc.s1_data.submission import check_file

    (tmp_path / "phase2_test.csv").write_text("ID,labels\n3,\n1,\n2,\n")
    good, short = tmp_path / "good.csv", tmp_path / "short.csv"
    good.write_text("ID,labels\n1,A\n2,B\n3,C\n")
    short.write_text("ID,labels\n1,A\n2,B\n")
    check_file(good, tmp_path, CLASSES)
    with pytest.raises(WBCError, match="short.csv: 1 test IDs missing, e.g. '3'"):
        check_file(short, tmp_path, CLASSES)
    with pytest.raises(WBCError, match="submission not found"):
        check_file(tmp_path / "none.csv", tmp_path, CLASSES)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from wbc.core.io import atomic_path, write_text

    p = tmp_path / "subs" / "x.csv"
    write_text(p, "ID,labels\n1,A\n")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("ID,lab")  # killed half-way
            raise RuntimeError("killed")
    assert p.read_text() == "ID,labels\n1,A\n" and [q.name for q in p.parent.iterdir()] == ["x.csv"]


@pytest.mark.parametrize("content,msg", [
    ("", ": not a readable CSV"),  # zero bytes
    ("ID,labels\n1,A\n2,B,extra\n3,C\n", ": not a readable CSV"),  # a row with too many fields
    ("ID,labels\n1,A,x\n2,B,x\n3,C,x\n", ":2: more fields than the header"),  # every row: not an index
    (None, ": submission is not a regular file"),  # a folder
])
def test_check_file_refuses_unreadable_files(tmp_path, content, msg):
    from wbc.s1_data.submission import check_file

    (tmp_path / "phase2_test.csv").write_text("ID,labels\n1,\n2,\n3,\n")
    sub = tmp_path / "sub.csv"
    if content is None:
        sub.mkdir()
    else:
        sub.write_text(content)
    with pytest.raises(WBCError, match=f"sub.csv{msg}"):
        check_file(sub, tmp_path, CLASSES)


def test_check_submission_cli_refuses_a_folder(capsys, sample_root, tmp_path):
    from wbc.__main__ import main

    code = main(["check-submission", "-c", "configs/recipes/tiny_cpu.yaml", f"data.root={sample_root}",
                 "--file", str(tmp_path)])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"{tmp_path}: submission is not a regular file" in lines[0]


def _pred_dir(tmp_path):
    """A data root with a 3-image test split and an empty predictions folder."""
    (tmp_path / "phase2_test.csv").write_text("ID,labels\n1,\n2,\n3,\n")
    pred = tmp_path / "run"
    pred.mkdir()
    return pred


@pytest.mark.parametrize("file,content,msg", [
    ("test_pred.csv", "ID,label\n1,A\n2,B\n3,C\n", "test_pred.csv:1: missing column(s) labels"),
    ("test_pred.csv", "", "test_pred.csv: not a readable CSV"),
    ("test_pred.csv", "ID,labels\n1,A\n9,B\n3,C\n", "test_pred.csv:3: ID '9' is not in the test split"),
    ("test.csv", "ID,prob_A,prob_B,prob_C\n1,1,0,0\n2,0,1,0\n", "test.csv: 1 test IDs missing, e.g. '3'"),
    ("report.json", "{", "report.json: not valid JSON"),
    ("report.json", "[1]", "report.json: not a JSON object"),
])
def test_submit_from_predictions_names_the_bad_file(tmp_path, file, content, msg):
    from wbc.s7_submit.submit import submit_from_predictions

    pred = _pred_dir(tmp_path)
    if file == "report.json":
        (pred / "test_pred.csv").write_text("ID,labels\n1,A\n2,B\n3,C\n")
    (pred / file).write_text(content)
    with pytest.raises(WBCError, match=re.escape(f"{pred / file}{msg[len(file):]}")):
        submit_from_predictions(pred, tmp_path, "x", CLASSES, out_dir=tmp_path / "subs")
    assert not (tmp_path / "subs").exists()


def test_sidecar_writes_nan_as_null(tmp_path):
    from wbc.s7_submit.submit import submit_from_predictions

    pred = _pred_dir(tmp_path)
    (pred / "test_pred.csv").write_text("ID,labels\n1,A\n2,B\n3,C\n")
    (pred / "report.json").write_text('{"oof": {"macro_f1": NaN}, "folds": [0]}')
    submit_from_predictions(pred, tmp_path, "x", CLASSES, out_dir=tmp_path / "subs")
    text = (tmp_path / "subs" / "x.json").read_text()
    side = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))
    assert side["cv_macro_f1"] is None and side["report"]["oof"]["macro_f1"] is None


def test_sidecar_config_names_no_local_data_root(tmp_path):
    import yaml

    from wbc.s7_submit.submit import submit_from_predictions

    pred = _pred_dir(tmp_path)
    (pred / "test_pred.csv").write_text("ID,labels\n1,A\n2,B\n3,C\n")
    (pred / "config.yaml").write_text(f"name: x\ndata:\n  root: {tmp_path}/lab/data\n  image_size: 128\n")
    submit_from_predictions(pred, tmp_path, "x", CLASSES, out_dir=tmp_path / "subs")
    text = (tmp_path / "subs" / "x.json").read_text()
    assert f"{tmp_path}/lab" not in text
    cfg = yaml.safe_load(json.loads(text)["config"])
    assert cfg["data"] == {"root": "<DATA>", "image_size": 128}


def test_a_failed_write_keeps_the_old_csv_and_sidecar_together(tmp_path):
    (tmp_path / "phase2_test.csv").write_text("ID,labels\n1,\n2,\n3,\n")
    subs = tmp_path / "subs"
    write_submission(tmp_path, ["1", "2", "3"], ["A", "A", "A"], "x", CLASSES, {"v": 1}, out_dir=subs)
    old = {p.name: p.read_text() for p in subs.iterdir()}
    with pytest.raises(TypeError):  # the sidecar cannot be written
        write_submission(tmp_path, ["1", "2", "3"], ["B", "B", "B"], "x", CLASSES, {"v": object()}, out_dir=subs)
    assert {p.name: p.read_text() for p in subs.iterdir()} == old


def test_a_class_mix_far_from_every_prior_is_warned_about_and_recorded():
    import pandas as pd

    from wbc.s1_data.submission import mix_warnings

    priors = {"phase1": pd.Series({"SNE": 0.4, "LY": 0.55, "PMY": 0.005, "MO": 0.045}),
              "phase2_eval": pd.Series({"SNE": 0.45, "LY": 0.5, "PMY": 0.01, "MO": 0.04})}
    flooded = pd.Series({"SNE": 0.3, "LY": 0.44, "PMY": 0.13, "MO": 0.13})  # PMY predicted for 140 of 1,080
    lines = mix_warnings(flooded, priors, ["SNE", "LY", "PMY", "MO"])
    assert lines == ["PMY is 13.0% of the predictions, at most 1.0% of any labelled split"]  # MO: 2.9x, not 3x
    assert mix_warnings(pd.Series({"SNE": 0.5, "LY": 0.5}), priors, ["SNE", "LY", "PMY", "MO"]) == [
        "MO is never predicted, 4.5% of a labelled split"]  # PMY (1 %) may go unpredicted
    assert mix_warnings(pd.Series({"SNE": 0.42, "LY": 0.52, "PMY": 0.01, "MO": 0.05}), priors,
                        ["SNE", "LY", "PMY", "MO"]) == []
