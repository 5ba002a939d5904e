from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wbc.core.errors import WBCError
from wbc.s1_data.sample import make_sample_dataset
from wbc.s2_folds.folds import build_folds, load_folds, make_folds


def test_every_id_once_and_stratified(sample_root, make_cfg):
    cfg = make_cfg(sample_root)
    f = build_folds(cfg)
    pool = pd.concat([pd.read_csv(sample_root / "phase1_label.csv", dtype=str),
                      pd.read_csv(sample_root / "phase2_train.csv", dtype=str)])
    assert sorted(f["ID"]) == sorted(pool["ID"]) and f["ID"].is_unique
    k = cfg["folds"]["n_folds"]
    assert set(f["fold"]) == set(range(k))
    ct = pd.crosstab(f["labels"], f["fold"])
    # stratified: per class, fold sizes differ by at most one image
    assert (ct.max(1) - ct.min(1)).max() <= 1
    # deterministic for a seed, different for another
    assert (build_folds(cfg)["fold"] == f["fold"]).all()
    other = build_folds(make_cfg(sample_root, "folds.seed=7"))
    assert not (other.set_index("ID").loc[f["ID"], "fold"].to_numpy() == f["fold"].to_numpy()).all()


def test_rare_classes_spread():
    labels = np.array(["A"] * 50 + ["B"] * 30 + ["R"] * 3)
    fold = make_folds(pd.DataFrame({"labels": labels}), 5, 0)
    assert len(set(fold[labels == "R"])) == 3  # 3 images of a class rarer than K land in 3 different folds


def test_grouped_folds_keep_groups_together(tmp_path, make_cfg):
    root = make_sample_dataset(tmp_path / "g", image_size=32, seed=1, with_groups=True)
    f = build_folds(make_cfg(root))
    assert "group" in f.columns
    assert f.groupby("group")["fold"].nunique().max() == 1
    assert f["fold"].nunique() == 5


def _pool_labels(root):
    return pd.concat([pd.read_csv(root / "phase1_label.csv", dtype=str),
                      pd.read_csv(root / "phase2_train.csv", dtype=str)])["labels"]


def test_classes_rarer_than_k_are_warned_about_and_spread(sample_root, make_cfg, capsys):
    counts = _pool_labels(sample_root).value_counts()
    k, rare = int(counts.min()) + 1, counts.idxmin()
    capsys.readouterr()
    f = build_folds(make_cfg(sample_root, f"folds.n_folds={k}"))
    out = " ".join(capsys.readouterr().out.split())
    assert f"classes rarer than {k} folds" in out and f"{rare} ({counts.min()})" in out
    assert f[f["labels"] == rare]["fold"].nunique() == counts.min()  # one image per fold, as many folds as it can
    build_folds(make_cfg(sample_root, "folds.n_folds=2"))
    assert "rarer" not in capsys.readouterr().out


def test_class_list_is_the_sorted_codes_or_the_config(sample_root):
    from wbc.s1_data.layout import class_list

    eval_labels = pd.read_csv(sample_root / "phase2_eval.csv", dtype=str)["labels"]
    codes = sorted(set(_pool_labels(sample_root)) | set(eval_labels))
    assert len(codes) > 3 and class_list({"data": {}}, sample_root) == codes
    assert class_list({"data": {"classes": ["Z", "A"]}}, sample_root) == ["Z", "A"]


@pytest.mark.parametrize("k", [1, 0, -3, 2.5, "five"])
def test_n_folds_below_two_or_not_whole_is_refused(sample_root, make_cfg, k):
    with pytest.raises(WBCError, match=rf"folds\.n_folds: (must be >= 2|expected an integer), got {k!r}"):
        build_folds(make_cfg(sample_root, f"folds.n_folds={k}"))  # refused as the config is read


def test_splitter_errors_are_one_line(capsys, data_copy, tmp_path):
    """Every class rarer than K: sklearn refuses, and the CLI says why in one line (no rare-class warning too)."""
    from wbc.__main__ import main

    k = int(_pool_labels(data_copy).value_counts().max()) + 1
    code = main(["folds", "-c", "configs/recipes/tiny_cpu.yaml", f"data.root={data_copy}",
                 f"folds.file={tmp_path / 'f.csv'}", f"folds.n_folds={k}"])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"error: cannot split the training pool into {k} folds" in lines[0]
    assert not (tmp_path / "f.csv").exists()


def _write_folds(cfg, rows):
    Path(cfg["folds"]["file"]).write_text("ID,labels,fold\n" + "".join(f"{r}\n" for r in rows))


def test_load_folds_reads_ids_labels_and_int_folds(sample_root, make_cfg):
    cfg = make_cfg(sample_root)
    _write_folds(cfg, ["a.jpg,NA,0", "b.jpg,LY,4"])
    f = load_folds(cfg)
    assert f["labels"].tolist() == ["NA", "LY"] and f["fold"].tolist() == [0, 4] and f["fold"].dtype.kind == "i"


@pytest.mark.parametrize("rows, match", [
    (["a.jpg,LY,0", "b.jpg,LY,1", "a.jpg ,LY,1"], "folds.csv:4: duplicate ID a.jpg"),
    (["a.jpg,LY,0", "b.jpg,LY,-1"], "folds.csv:3: fold '-1' is not one of 0..4"),
    (["a.jpg,LY,5"], "folds.csv:2: fold '5' is not one of 0..4"),
    (["a.jpg,LY,1.5"], "folds.csv:2: fold '1.5' is not one of 0..4"),
    (["a.jpg,LY,"], "folds.csv:2: fold '' is not one of 0..4"),
])
def test_load_folds_refuses_duplicates_and_bad_folds(sample_root, make_cfg, rows, match):
    cfg = make_cfg(sample_root)
    _write_folds(cfg, rows)
    with pytest.raises(WBCError, match=match):
        load_folds(cfg)
