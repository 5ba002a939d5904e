"""Pseudo-labels: selection (`wbc.optional.pseudo.select`), the training file's checks and its use by `train_fold`."""
import json

import numpy as np
import pandas as pd
import pytest

from helpers import write_folds
from wbc.core.errors import WBCError
from wbc.core.io import Probs, load_probs, save_probs, write_csv
from wbc.core.run_folder import run_dir
from wbc.optional.pseudo.select import pseudo_label, select
from wbc.s1_data.layout import read_split
from wbc.s3_train import loop
from wbc.s3_train.inputs import load_fold_data

CLASSES = ["A", "B", "C"]


def test_select_threshold_and_class_fraction():
    probs = np.array([[0.95, 0.05, 0.0], [0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.5, 0.5, 0.0],
                      [0.1, 0.9, 0.0], [0.2, 0.1, 0.7], [0.3, 0.35, 0.35]])
    decided = np.array(["A", "A", "A", "B", "B", "C", "B"])  # row 3's decision is not its argmax
    ids = [f"i{k}" for k in range(7)]
    sel = select(ids, CLASSES, probs, decided, 0.7, 1.0)
    assert list(sel["ID"]) == ["i0", "i1", "i4", "i5"]
    assert list(sel["labels"]) == ["A", "A", "B", "C"]
    assert np.allclose(sel["confidence"], [0.95, 0.8, 0.9, 0.7])
    # The confidence is the decided class's probability: row 3 (decided B at 0.5) passes at 0.5, row 6 does not.
    assert "i3" in set(select(ids, CLASSES, probs, decided, 0.5, 1.0)["ID"])
    assert "i6" not in set(select(ids, CLASSES, probs, decided, 0.5, 1.0)["ID"])
    # class_fraction 0.5 keeps ceil(half) of each decided class, the most confident first.
    half = select(ids, CLASSES, probs, decided, 0.0, 0.5)
    assert sorted(half["ID"]) == ["i0", "i1", "i3", "i4", "i5"]  # A: 2 of 3, B: i4 and i3 (not i6), C: 1 of 1
    # Most confident first, whatever the row order: the quota of A (2 of 3) keeps i0 and i1 when listed last.
    rev = select(ids[::-1], CLASSES, probs[::-1], decided[::-1], 0.0, 0.5)
    assert sorted(rev["ID"]) == ["i0", "i1", "i3", "i4", "i5"]
    with pytest.raises(WBCError, match="class_fraction"):
        select(ids, CLASSES, probs, decided, 0.5, 0.0)
    with pytest.raises(WBCError, match="not a class"):
        select(ids, CLASSES, probs, np.array(["A"] * 6 + ["Z"]), 0.5, 1.0)


def _pred_folder(root, tmp_path, classes):
    """A predictions folder for the sample data: random probabilities, decisions = argmax except that every
    fifth eval image is decided as the next class (so decisions differ from both argmax and truth). Rows are
    shuffled against the split CSV, and the decisions file is in yet another order: everything is keyed by ID."""
    rng = np.random.default_rng(0)
    pred = tmp_path / "pred"
    for part, split in [("test", "phase2_test"), ("eval", "phase2_eval")]:
        df = read_split(root, split, check_images=False)
        df = df.iloc[rng.permutation(len(df))].reset_index(drop=True)
        p = rng.dirichlet(np.full(len(classes), 0.3), len(df))
        labels = df["labels"].to_numpy() if part == "eval" else None
        save_probs(pred / f"{part}.csv", Probs(df["ID"], p, classes, labels=labels))
        decided = np.asarray(classes)[p.argmax(1)]
        if part == "eval":
            decided[::5] = np.asarray(classes)[(p.argmax(1)[::5] + 1) % len(classes)]
            write_csv(pred / "eval_pred.csv", pd.DataFrame({"ID": df["ID"], "labels": decided}).iloc[::-1])
    return pred


def test_pseudo_label_writes_decisions_never_truth(sample_root, make_cfg, tmp_path):
    cfg = make_cfg(sample_root)
    classes = sorted(set(read_split(sample_root, "phase1", check_images=False)["labels"]))
    pred = _pred_folder(sample_root, tmp_path, classes)
    path = pseudo_label(cfg, pred, ["phase2_test", "phase2_eval"], 0.6, 1.0)
    assert path.name == "pred.csv" and path.with_suffix(".json").exists()
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(df.columns) == ["ID", "labels", "split", "confidence"]
    ev = load_probs(pred / "eval.csv")
    dec = pd.read_csv(pred / "eval_pred.csv", dtype=str).set_index("ID")["labels"]
    got = df[df["split"] == "phase2_eval"].set_index("ID")
    assert len(got) and (got["labels"] == dec.loc[got.index]).all()  # the tuned rule's decisions
    lut = {c: i for i, c in enumerate(classes)}
    conf = {i: ev.probs[k, lut[dec[i]]] for k, i in enumerate(ev.ids)}
    assert all(conf[i] >= 0.6 for i in got.index)
    assert sum(v >= 0.6 for v in conf.values()) == len(got)
    te = load_probs(pred / "test.csv")
    n_te = int((te.probs.max(1) >= 0.6).sum())  # test has no _pred file: argmax
    assert (df["split"] == "phase2_test").sum() == n_te
    import json
    rep = json.loads(path.with_suffix(".json").read_text())
    truth = pd.Series(ev.labels, index=ev.ids).loc[got.index]
    assert rep["splits"]["phase2_eval"]["precision"] == pytest.approx((truth == got["labels"]).mean())
    assert "precision" not in rep["splits"]["phase2_test"]
    with pytest.raises(WBCError, match="labelled training data"):
        pseudo_label(cfg, pred, ["phase1"])


def _fold_cfg(sample_root, make_cfg, tmp_path, rows, *extra):
    path = tmp_path / "pseudo.csv"
    pd.DataFrame(rows, columns=["ID", "labels"]).to_csv(path, index=False)
    cfg = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=1", f"data.pseudo_labels={path}", *extra)
    write_folds(cfg)
    return cfg, path


@pytest.mark.parametrize("case, match", [
    ("dup", "pseudo.csv:3: duplicate ID"), ("label", "pseudo.csv:2: unknown label 'ZZ'"),
    ("pool", "pseudo.csv:2: ID .* is in the labelled training pool"), ("nowhere", "pseudo.csv:2: ID nope.jpg"),
])
def test_bad_pseudo_file_is_one_line_naming_file_and_row(sample_root, make_cfg, tmp_path, case, match):
    test_id = read_split(sample_root, "phase2_test", check_images=False)["ID"].iloc[0]
    pool_id = read_split(sample_root, "phase1", check_images=False)["ID"].iloc[0]
    rows = {"dup": [(test_id, "LY"), (test_id, "LY")], "label": [(test_id, "ZZ")], "pool": [(pool_id, "LY")],
            "nowhere": [("nope.jpg", "LY")]}[case]
    cfg, _ = _fold_cfg(sample_root, make_cfg, tmp_path, rows)
    with pytest.raises(WBCError, match=match) as e:
        load_fold_data(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_train_fold_trains_on_pseudo_rows_and_never_validates_on_them(sample_root, make_cfg, tmp_path, monkeypatch):
    test = read_split(sample_root, "phase2_test", check_images=False)
    ev = read_split(sample_root, "phase2_eval", check_images=False)
    classes = sorted(set(read_split(sample_root, "phase1", check_images=False)["labels"]))
    rows = [(i, classes[k % len(classes)]) for k, i in enumerate(test["ID"].iloc[:7])]
    rows.append((ev["ID"].iloc[3], classes[0]))
    cfg, _ = _fold_cfg(sample_root, make_cfg, tmp_path, rows)
    data = load_fold_data(cfg)
    seen = {}
    real = loop.CellDataset

    def spy(images, targets, transform, seed):
        seen["images"], seen["targets"] = images, np.asarray(targets)
        return real(images, targets, transform, seed)

    monkeypatch.setattr(loop, "CellDataset", spy)
    loop.train_fold(cfg, 0, data=data)
    tr = np.flatnonzero(data.pool["fold"].to_numpy() != 0)
    assert len(seen["images"]) == len(tr) + 8
    lut = {c: i for i, c in enumerate(classes)}
    tail = seen["targets"][len(tr):]
    images = [np.asarray(seen["images"][len(tr) + k]) for k in range(8)]
    # Each pseudo row is its own image with its pseudo label (rows are grouped by source split).
    expect = {**{i: (data.test_images[k], lut[c]) for k, (i, c) in enumerate(rows[:7])},
              ev["ID"].iloc[3]: (data.holdout_images[3], lut[classes[0]])}
    got = sorted((img.tobytes(), int(t)) for img, t in zip(images, tail))
    assert got == sorted((img.tobytes(), t) for img, t in expect.values())
    assert seen["targets"][:len(tr)].tolist() == data.pool["labels"].map(lut).to_numpy()[tr].tolist()
    assert json.loads((run_dir(cfg) / "fold0" / "train_result.json").read_text())["extra_rows"] == 8


def test_without_pseudo_labels_the_training_set_is_the_pool(sample_root, make_cfg, tmp_path):
    cfg = make_cfg(sample_root, "folds.n_folds=2")
    write_folds(cfg)
    data = load_fold_data(cfg)
    extra = data.extra_rows()
    assert data.extra is None and len(extra.images) == 0 and len(extra.labels) == 0
    cfg["data"]["pseudo_labels"] = str(tmp_path / "missing.csv")
    with pytest.raises(WBCError, match=r"missing.csv: file \(data.pseudo_labels\) not found"):
        load_fold_data(cfg)
