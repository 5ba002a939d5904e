"""Synthetic sample dataset: layout and columns, long tail, determinism, damage, groups, masks, atomic writes."""
import argparse
import hashlib

import cv2
import numpy as np
import pandas as pd
import pytest

from wbc.__main__ import COMMAND_MODULES
from wbc.core.errors import WBCError
from wbc.s1_data import cli
from wbc.s1_data import sample as S
from wbc.s1_data.layout import read_split

SMALL = dict(n_phase1=40, n_train=40, n_eval=16, n_test=16, image_size=48)
TINY = dict(n_phase1=24, n_train=16, n_eval=8, n_test=8, image_size=32)


@pytest.fixture(scope="module")
def default_root(tmp_path_factory):
    """Default counts; 64 px keeps the test quick."""
    return S.make_sample_dataset(tmp_path_factory.mktemp("d") / "sample", image_size=64)


def csv(root, name):
    return pd.read_csv(root / name, dtype=str, keep_default_na=False)


def digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_and_columns(default_root):
    r = default_root
    assert sorted(p.name for p in r.iterdir()) == ["README.md", "phase1", "phase1_label.csv", "phase2",
                                                   "phase2_eval.csv", "phase2_test.csv", "phase2_train.csv",
                                                   "test_labels_hidden.csv"]
    assert sorted(p.name for p in (r / "phase2").iterdir()) == ["eval", "test", "train"]
    expect = {"phase1_label.csv": (["ID", "labels", "split"], "phase1_train", 10000001, 240),
              "phase2_train.csv": (["ID", "labels", "split", "severity"], "phase2_train", 20000001, 240),
              "phase2_eval.csv": (["ID", "labels", "split", "severity"], "phase2_eval", 30000001, 80),
              "phase2_test.csv": (["ID", "labels"], None, 40000001, 120)}
    for name, (cols, split, first, n) in expect.items():
        df = csv(r, name)
        assert list(df.columns) == cols and len(df) == n
        assert list(df["ID"]) == [f"{first + i}.jpg" for i in range(n)]
        if split:
            assert (df["split"] == split).all() and (df["labels"] != "").all()
    assert (csv(r, "phase2_test.csv")["labels"] == "").all()
    hidden = csv(r, "test_labels_hidden.csv")
    assert list(hidden.columns) == ["ID", "labels", "severity"]
    assert list(hidden["ID"]) == list(csv(r, "phase2_test.csv")["ID"]) and set(hidden["labels"]) == set(S.CLASSES)
    for split in ("phase1", "phase2_train", "phase2_eval", "phase2_test"):
        read_split(r, split)  # the project's own reader accepts it, images included
    assert "phase2_eval.csv" in (r / "README.md").read_text()


def test_long_tail_and_class_coverage(default_root):
    pool = pd.concat([csv(default_root, "phase1_label.csv"), csv(default_root, "phase2_train.csv")])
    counts = pool["labels"].value_counts()
    assert set(counts.index) == set(S.CLASSES)
    assert counts.min() >= 5
    assert 12 <= counts.max() / counts.min() <= 30
    assert counts.idxmax() == "SNE" and counts.idxmin() == "PLT"
    assert set(csv(default_root, "phase2_eval.csv")["labels"]) == set(S.CLASSES)


def test_severity_mix_per_split(default_root):
    train = csv(default_root, "phase2_train.csv")["severity"].astype(int)
    ev = csv(default_root, "phase2_eval.csv")["severity"].astype(int)
    test = csv(default_root, "test_labels_hidden.csv")["severity"].astype(int)
    assert train.isin([0, 1]).mean() > 0.75 and set(ev) == {0, 1, 2}
    assert test.isin([2, 3]).mean() > 0.65 and test.mean() > ev.mean() > train.mean()


def test_images_decode_and_damaged_ones_differ_from_clean(default_root):
    rows = []
    for split in ("phase1", "phase2_train", "phase2_eval"):
        df = read_split(default_root, split).iloc[:80]
        for path, image_id, label, sev in zip(df["path"], df["ID"], df["labels"],
                                              df.get("severity", pd.Series("0", index=df.index))):
            img = cv2.imread(path)
            assert img.shape == (64, 64, 3)
            clean = S.clean_image(image_id, label, seed=0, size=64)
            err = np.mean((cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(float) - clean) ** 2)
            rows.append((int(sev), 10 * np.log10(255**2 / err)))
    psnr = pd.DataFrame(rows, columns=["sev", "psnr"])
    # clean files differ from the rendering by JPEG only; every damaged file is further away
    assert psnr[psnr.sev == 0].psnr.min() > 33
    assert psnr[psnr.sev > 0].psnr.max() < psnr[psnr.sev == 0].psnr.min()
    assert psnr.groupby("sev").psnr.mean().is_monotonic_decreasing


def test_same_seed_same_bytes(tmp_path):
    a = S.make_sample_dataset(tmp_path / "a", seed=3, **SMALL)
    b = S.make_sample_dataset(tmp_path / "b", seed=3, **SMALL)
    c = S.make_sample_dataset(tmp_path / "c", seed=4, **SMALL)
    assert digest(a) == digest(b) != digest(c)
    img = cv2.imread(str(a / "phase2" / "test" / "40000001.jpg"))
    assert img.shape == (48, 48, 3)


def test_groups_column(tmp_path):
    plain = S.make_sample_dataset(tmp_path / "plain", seed=1, **TINY)
    root = S.make_sample_dataset(tmp_path / "g", seed=1, with_groups=True, **TINY)
    for name in ("phase1_label.csv", "phase2_train.csv", "phase2_eval.csv"):
        df = csv(root, name)
        assert list(df.columns)[-1] == "patient" and (df["patient"] != "").all()
        sizes = df["patient"].value_counts()
        assert sizes.max() > 1 and df["patient"].nunique() >= 2
        assert "patient" not in csv(plain, name).columns
    assert "patient" not in csv(root, "phase2_test.csv").columns
    spans = pd.concat([csv(root, n).assign(f=n) for n in ("phase1_label.csv", "phase2_train.csv")])
    assert spans.groupby("patient")["f"].nunique().max() == 1
    # the column is metadata only: the images are the same as without it
    assert (root / "phase1" / "10000001.jpg").read_bytes() == (plain / "phase1" / "10000001.jpg").read_bytes()


def test_class_subset_and_bad_requests(tmp_path):
    root = S.make_sample_dataset(tmp_path / "sub", classes=["LY", "SNE", "BNE"], **TINY)
    assert set(csv(root, "phase1_label.csv")["labels"]) == {"LY", "SNE", "BNE"}
    with pytest.raises(WBCError, match="classes"):
        S.make_sample_dataset(tmp_path / "x", classes=["LY", "XX"], **TINY)
    with pytest.raises(WBCError, match="cannot hold"):
        S.make_sample_dataset(tmp_path / "x", **{**TINY, "n_eval": 3})
    assert not (tmp_path / "x").exists()


def test_atomic_write_and_replace(tmp_path, monkeypatch):
    calls = []

    def failing(path, rgb):
        calls.append(path)
        if len(calls) > 10:
            raise OSError("disk full")
        real(path, rgb)

    real = S._write_jpeg
    monkeypatch.setattr(S, "_write_jpeg", failing)
    with pytest.raises(OSError):
        S.make_sample_dataset(tmp_path / "crash", **TINY)
    assert list(tmp_path.iterdir()) == []  # no dataset, no temporary folder
    monkeypatch.setattr(S, "_write_jpeg", real)

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(WBCError, match="not a sample dataset"):
        S.make_sample_dataset(other, **TINY)
    assert (other / "notes.txt").read_text() == "keep me"
    S.make_sample_dataset(other, overwrite=True, **TINY)
    assert not (other / "notes.txt").exists()
    S.make_sample_dataset(other, seed=9, **TINY)  # an earlier sample dataset is replaced without asking
    assert "seed 9" in (other / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_cli(tmp_path, capsys):
    assert "wbc.s1_data.cli" in COMMAND_MODULES
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())  # only this command: the full CLI imports every step
    out = tmp_path / "cli"
    args = parser.parse_args(["sample-data", "--out", str(out), "--scale", "0.2", "--size", "40", "--seed", "2"])
    args.func(args)
    text = capsys.readouterr().out
    assert "phase2_eval" in text and "SNE" in text and "total" in text
    assert len(csv(out, "phase1_label.csv")) == 48 and cv2.imread(str(out / "phase1" / "10000001.jpg")).shape[0] == 40


def test_draw_cell_ground_truth():
    ratios = {}
    for label, size, seed in [(c, z, s) for c in S.CLASSES for z in (96, 224) for s in range(3)]:
        d = S.draw_cell(label, np.random.default_rng(seed), size)
        assert d.image.shape == (size, size, 3) and d.image.dtype == np.uint8
        assert d.cell_mask.dtype == bool and d.nucleus_mask.any()
        assert not (d.nucleus_mask & ~d.cell_mask).any()
        ratios.setdefault(label, []).append(d.nucleus_mask.sum() / d.cell_mask.sum())
        if label == "PLT":
            assert d.lobes == 0 and d.cell_mask.mean() < 0.05
            continue
        assert d.lobes == {"SNE": d.lobes, "EO": 2, "BA": 2}.get(label, 1) >= 1
        grey = d.image.mean(2)  # the nucleus is darker than the cytoplasm
        assert grey[d.nucleus_mask].mean() < grey[d.cell_mask & ~d.nucleus_mask].mean() - 20
        # the lobes are what is left after cutting the thin strands between them
        radius = int(0.07 * np.sqrt(d.cell_mask.sum() / np.pi))
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
        opened = cv2.morphologyEx(d.nucleus_mask.astype(np.uint8), cv2.MORPH_OPEN, k)
        assert cv2.connectedComponents(opened)[0] - 1 == d.lobes, (label, size, seed)
        assert cv2.connectedComponents(d.nucleus_mask.astype(np.uint8))[0] - 1 == 1  # joined before the cut
    assert {S.draw_cell("SNE", np.random.default_rng(s), 96).lobes for s in range(30)} == {2, 3, 4, 5}
    assert all(np.mean(ratios["LY"]) > np.mean(ratios[c]) for c in S.CLASSES if c not in ("LY", "PLT"))
    a = S.draw_cell("MO", np.random.default_rng(1), 64).image
    assert np.array_equal(a, S.draw_cell("MO", np.random.default_rng(1), 64).image)
    with pytest.raises(ValueError, match="no drawing"):
        S.draw_cell("XX", np.random.default_rng(0))


def test_every_class_gets_its_minimum_when_the_split_is_just_big_enough(tmp_path):
    """TINY is exactly 3 / 2 / 1 / 1 images per class: the long-tail proportions alone would give PLT none."""
    root = S.make_sample_dataset(tmp_path / "tiny", **TINY)
    for name, n in [("phase1_label.csv", 3), ("phase2_train.csv", 2), ("phase2_eval.csv", 1),
                    ("test_labels_hidden.csv", 1)]:
        counts = csv(root, name)["labels"].value_counts()
        assert set(counts.index) == set(S.CLASSES) and (counts == n).all(), name
