"""Every kind of bad input ends in one error line naming the file and row, exit 2, nothing written."""
import pandas as pd
import pytest

from helpers import edit_csv
from wbc.__main__ import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, (out.out + out.err).strip()


def folds_cli(capsys, root, tmp_path, *extra):
    return run_cli(capsys, "folds", "-c", "configs/recipes/tiny_cpu.yaml", f"data.root={root}",
                   f"folds.file={tmp_path / 'folds.csv'}", *extra)


def assert_one_error(code, text, *needles):
    assert code == 2
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    for n in needles:
        assert n in lines[0], lines[0]


def test_good_input_writes_folds(capsys, data_copy, tmp_path):
    code, _ = folds_cli(capsys, data_copy, tmp_path)
    assert code == 0 and (tmp_path / "folds.csv").exists()


def test_missing_image(capsys, data_copy, tmp_path):
    ids = pd.read_csv(data_copy / "phase2_train.csv", dtype=str)["ID"]
    (data_copy / "phase2" / "train" / ids[4]).unlink()
    code, text = folds_cli(capsys, data_copy, tmp_path)
    assert_one_error(code, text, "phase2_train.csv:6", "image not found", ids[4])
    assert not (tmp_path / "folds.csv").exists()


def test_duplicate_id(capsys, data_copy, tmp_path):
    edit_csv(data_copy / "phase1_label.csv", lambda d: pd.concat([d, d.iloc[[2]]], ignore_index=True))
    n = len(pd.read_csv(data_copy / "phase1_label.csv"))
    code, text = folds_cli(capsys, data_copy, tmp_path)
    assert_one_error(code, text, f"phase1_label.csv:{n + 1}", "duplicate ID")
    assert "another split" not in text  # caught inside its own split, not only by the cross-split check
    assert not (tmp_path / "folds.csv").exists()


def test_duplicate_id_across_splits(capsys, data_copy, tmp_path):
    first = pd.read_csv(data_copy / "phase1_label.csv", dtype=str).iloc[0]
    edit_csv(data_copy / "phase2_train.csv", lambda d: d.assign(ID=[first["ID"]] + list(d["ID"][1:])))
    (data_copy / "phase2" / "train" / first["ID"]).write_bytes((data_copy / "phase1" / first["ID"]).read_bytes())
    code, text = folds_cli(capsys, data_copy, tmp_path)
    assert_one_error(code, text, "phase2_train.csv:2", "duplicate ID", "another split")


def test_unknown_label(capsys, data_copy, tmp_path):
    classes = sorted(pd.read_csv(data_copy / "phase1_label.csv")["labels"].unique())
    edit_csv(data_copy / "phase2_train.csv", lambda d: d.assign(labels=["XYZ"] * 3 + list(d["labels"][3:])))
    code, text = folds_cli(capsys, data_copy, tmp_path, f"data.classes=[{','.join(classes)}]")
    assert_one_error(code, text, "phase2_train.csv:2", "unknown label 'XYZ'")


@pytest.mark.parametrize("old,new", [("labels", "label"), ("ID", "image")])
def test_renamed_column(capsys, data_copy, tmp_path, old, new):
    edit_csv(data_copy / "phase1_label.csv", lambda d: d.rename(columns={old: new}))
    code, text = folds_cli(capsys, data_copy, tmp_path)
    assert_one_error(code, text, "phase1_label.csv:1", f"missing column(s) {old}")


def test_empty_split(capsys, data_copy, tmp_path):
    edit_csv(data_copy / "phase2_train.csv", lambda d: d.iloc[:0])
    code, text = folds_cli(capsys, data_copy, tmp_path)
    assert_one_error(code, text, "phase2_train.csv", "is empty")


def test_truncated_and_unreadable_jpeg(capsys, data_copy, tmp_path):
    from wbc.core.errors import WBCError
    from wbc.s1_data.cache import read_image

    ids = pd.read_csv(data_copy / "phase1_label.csv", dtype=str)["ID"]
    p = data_copy / "phase1" / ids[7]
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(WBCError, match="(truncated JPEG|unreadable image)"):
        read_image(p)
    assert folds_cli(capsys, data_copy, tmp_path)[0] == 0  # folds need only the CSVs
    code, text = run_cli(capsys, "train-fold", "-c", "configs/recipes/tiny_cpu.yaml", "--fold", "0",
                         f"data.root={data_copy}", f"folds.file={tmp_path / 'folds.csv'}",
                         f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert_one_error(code, text, "phase1_label.csv:9", ids[7])
    assert "truncated JPEG" in text or "unreadable image" in text
    assert not list((tmp_path / "cache").rglob("*.u8"))  # no half-built cache
    (data_copy / "phase1" / ids[3]).write_bytes(b"not a jpeg at all")
    with pytest.raises(WBCError, match="unreadable image"):
        read_image(data_copy / "phase1" / ids[3])


def test_empty_label_in_a_labelled_split(capsys, data_copy, tmp_path):
    edit_csv(data_copy / "phase2_train.csv", lambda d: d.assign(labels=d["labels"].where(d.index != 2, "")))
    code, text = folds_cli(capsys, data_copy, tmp_path)
    assert_one_error(code, text, "phase2_train.csv:4", "empty label")
    assert not (tmp_path / "folds.csv").exists()


def test_truncated_jpeg_that_the_decoder_accepts(monkeypatch, data_copy):
    """Some OpenCV / libjpeg builds decode a truncated JPEG (grey bottom rows) instead of failing; the missing
    end-of-image marker still gives it away. Simulated here with a lenient decoder."""
    import numpy as np

    import wbc.s1_data.cache as cache
    from wbc.core.errors import WBCError

    ids = pd.read_csv(data_copy / "phase1_label.csv", dtype=str)["ID"]
    whole, cut = data_copy / "phase1" / ids[1], data_copy / "phase1" / ids[7]
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) * 3 // 4])
    monkeypatch.setattr(cache.cv2, "imdecode", lambda buf, flag: np.zeros((8, 8, 3), np.uint8))
    assert cache.read_image(whole).shape == (8, 8, 3)  # a complete file passes
    with pytest.raises(WBCError, match=f"phase1_label.csv:9: truncated JPEG: .*{ids[7]}"):
        cache.read_image(cut, data_copy / "phase1_label.csv", 9)
