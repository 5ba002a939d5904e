import numpy as np
import pandas as pd

from wbc.data.sample import make_sample_dataset
from wbc.folds import build_folds, make_folds


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
    from wbc.data.layout import class_list

    eval_labels = pd.read_csv(sample_root / "phase2_eval.csv", dtype=str)["labels"]
    codes = sorted(set(_pool_labels(sample_root)) | set(eval_labels))
    assert len(codes) > 3 and class_list({"data": {}}, sample_root) == codes
    assert class_list({"data": {"classes": ["Z", "A"]}}, sample_root) == ["Z", "A"]
