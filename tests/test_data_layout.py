"""Reading the dataset: label typos, optional group columns, and what counts as a complete JPEG."""
import cv2
import numpy as np
import pandas as pd
import pytest

from helpers import edit_csv, write_folds
from wbc.__main__ import main
from wbc.s1_data.layout import read_splits
from wbc.s1_data.sample import make_sample_dataset
from wbc.s2_folds.folds import build_folds

POOL = ["phase1", "phase2_train"]


@pytest.fixture
def small(tmp_path):
    """A small sample dataset with a patient column, private to the test."""
    return make_sample_dataset(tmp_path / "small", n_phase1=36, n_train=36, n_eval=12, n_test=18, image_size=32,
                               seed=1, with_groups=True)


def set_cell(path, i, col, value):
    def put(d):
        d.loc[i, col] = value
        return d

    edit_csv(path, put)


def folds_error(capsys, root, tmp_path, *extra):
    """The one error line of `wbc folds`, which must exit 2 and write nothing."""
    code = main(["folds", "-c", "configs/recipes/tiny_cpu.yaml", f"data.root={root}",
                 f"folds.file={tmp_path / 'f.csv'}", *extra])
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert not (tmp_path / "f.csv").exists()
    return lines[0]


def test_label_differing_only_by_case_is_refused(capsys, small, tmp_path):
    csv = small / "phase2_train.csv"
    label = pd.read_csv(csv, dtype=str)["labels"][3]
    set_cell(csv, 3, "labels", f" {label.lower()}")
    line = folds_error(capsys, small, tmp_path)
    assert "phase2_train.csv:5" in line and f"'{label.lower()}' differs from '{label}' only by case" in line


@pytest.mark.parametrize("token", ["nan", "NaN", "NA", "N/A", "None", "null"])
def test_missing_value_tokens_are_not_labels(capsys, small, tmp_path, token):
    set_cell(small / "phase1_label.csv", 6, "labels", token)
    line = folds_error(capsys, small, tmp_path)
    assert "phase1_label.csv:8" in line and f"label '{token}' is a missing value" in line


def test_eval_label_never_in_the_training_pool_is_refused(capsys, small, tmp_path, make_cfg):
    set_cell(small / "phase2_eval.csv", 4, "labels", "XX")
    line = folds_error(capsys, small, tmp_path)
    assert "phase2_eval.csv:6" in line and "label 'XX' never appears in the training pool" in line
    classes = sorted(set(pd.read_csv(small / "phase1_label.csv")["labels"])) + ["XX"]
    build_folds(make_cfg(small, f"data.classes=[{','.join(classes)}]"))  # a configured class list is trusted


def test_group_values_are_stripped(small, make_cfg):
    csv = small / "phase1_label.csv"
    patients = pd.read_csv(csv, dtype=str)["patient"]
    first = patients == patients[0]
    edit_csv(csv, lambda d: d.assign(patient=d["patient"].where(~first | (d.index % 2 == 0), patients[0] + " ")))
    pool = read_splits(small, POOL, check_images=False)
    assert (pool["patient"] == patients[0]).sum() == first.sum()
    f = build_folds(make_cfg(small))
    assert f.groupby("group")["fold"].nunique().max() == 1


def test_blank_groups_are_one_group_each(small, make_cfg):
    edit_csv(small / "phase2_train.csv", lambda d: d.assign(patient=""))
    f = build_folds(make_cfg(small))
    blank = f["group"] == ""
    assert blank.sum() == 36 and f[blank]["fold"].nunique() == 5  # spread, not lumped into one group
    assert f[~blank].groupby("group")["fold"].nunique().max() == 1


def test_group_column_in_only_some_pool_splits(small, make_cfg):
    edit_csv(small / "phase2_train.csv", lambda d: d.drop(columns="patient"))
    pool = read_splits(small, POOL, check_images=False)
    assert (pool.loc[pool["split"] == "phase2_train", "patient"] == "").all()
    f = build_folds(make_cfg(small))
    assert f[f["group"] == ""]["fold"].nunique() == 5
    assert f[f["group"] != ""].groupby("group")["fold"].nunique().max() == 1


def test_fewer_groups_than_folds_is_one_error(capsys, small, tmp_path):
    for name in ("phase1_label.csv", "phase2_train.csv"):
        edit_csv(small / name, lambda d: d.assign(patient=["P1", "P2"] * (len(d) // 2)))
    line = folds_error(capsys, small, tmp_path)
    assert "2 groups in column 'patient'" in line and "fewer than 5 folds" in line


def _jpeg(size=48):
    img = np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def test_complete_jpeg_with_padding_or_trailer_is_accepted(tmp_path):
    from wbc.s1_data.cache import read_image

    p = tmp_path / "a.jpg"
    for tail in (b"\0" * 200, np.random.default_rng(1).bytes(5000)):
        p.write_bytes(_jpeg() + tail)
        assert read_image(p).shape == (48, 48, 3)


def test_truncated_jpeg_with_a_thumbnail_is_still_refused(monkeypatch, tmp_path):
    """An EXIF thumbnail carries its own end-of-image marker: that one must not pass for the image's."""
    import wbc.s1_data.cache as cache
    from wbc.core.errors import WBCError

    thumb = _jpeg(8)
    app1 = b"\xff\xe1" + (len(thumb) + 8).to_bytes(2, "big") + b"Exif\0\0" + thumb
    main_jpeg = _jpeg()
    whole = main_jpeg[:2] + app1 + main_jpeg[2:]
    monkeypatch.setattr(cache.cv2, "imdecode", lambda buf, flag: np.zeros((8, 8, 3), np.uint8))  # lenient decoder
    p = tmp_path / "t.jpg"
    p.write_bytes(whole)
    assert cache.read_image(p).shape == (8, 8, 3)
    p.write_bytes(whole[: len(whole) - 40])
    with pytest.raises(WBCError, match="truncated JPEG"):
        cache.read_image(p)


def test_png_named_jpg_is_read(tmp_path):
    from wbc.s1_data.cache import read_image

    img = np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)
    p = tmp_path / "png.jpg"
    p.write_bytes(cv2.imencode(".png", img)[1].tobytes())
    np.testing.assert_array_equal(read_image(p), img[..., ::-1])


@pytest.mark.parametrize("bad", ["../phase1/x.jpg", "/etc/passwd"])
def test_an_id_that_points_outside_its_folder_is_refused(capsys, small, tmp_path, bad):
    set_cell(small / "phase2_train.csv", 2, "ID", bad)
    line = folds_error(capsys, small, tmp_path)
    assert "phase2_train.csv:4" in line and f"ID '{bad}' points outside the split's folder" in line


def test_an_image_in_the_pool_and_the_test_split_is_refused(small, make_cfg):
    import shutil

    from wbc.core.errors import WBCError
    from wbc.s3_train.inputs import load_fold_data

    cfg = make_cfg(small, "data.image_size=32")
    write_folds(cfg)
    pool_id = pd.read_csv(small / "phase2_train.csv", dtype=str)["ID"][0]
    shutil.copy(small / "phase2" / "train" / pool_id, small / "phase2" / "test" / pool_id)
    edit_csv(small / "phase2_test.csv", lambda d: pd.concat([d, pd.DataFrame({"ID": [pool_id], "labels": [""]})]))
    with pytest.raises(WBCError, match=f"phase2_test.csv:.*duplicate ID {pool_id} \\(also in another split\\)"):
        load_fold_data(cfg)
