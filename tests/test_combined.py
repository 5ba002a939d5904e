"""`split-labels`: the competition's single combined label file as the layout's per-split files."""
import pandas as pd
import pytest

from helpers import edit_csv
from wbc.__main__ import main
from wbc.core.errors import WBCError
from wbc.s1_data.combined import parse_map, split_label_file
from wbc.s1_data.layout import LABELLED, SPLITS, read_split, read_splits

VALUE = {"phase1": "", "phase2_train": "train", "phase2_eval": "eval", "phase2_test": "test"}


def _combined(root, path):
    """The sample's four split files as one combined file, `img_dir` naming each row's folder."""
    frames = []
    for s, (csv, folder) in SPLITS.items():
        df = pd.read_csv(root / csv, dtype=str, keep_default_na=False)
        frames.append(df.assign(split=VALUE[s], img_dir=folder))
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    for csv, _ in SPLITS.values():
        (root / csv).unlink()


def test_a_combined_file_gives_the_same_splits_and_honours_img_dir(data_copy, tmp_path, capsys):
    before = {s: read_split(data_copy, s)[["ID", "labels", "path"]] for s in SPLITS}
    combined = tmp_path / "combined_train.csv"
    _combined(data_copy, combined)
    assert main(["split-labels", "--labels", str(combined), f"data.root={data_copy}"]) == 0
    assert "phase2_train.csv" in capsys.readouterr().out
    for s in SPLITS:
        pd.testing.assert_frame_equal(read_split(data_copy, s)[["ID", "labels", "path"]], before[s])
    # a phase1 image listed as a phase2 training row keeps its folder through img_dir
    edit_csv(combined, lambda d: d.assign(split=["train"] + list(d["split"][1:])))
    split_label_file(combined, data_copy)
    moved = pd.read_csv(combined, dtype=str)["ID"][0]
    train = read_split(data_copy, "phase2_train").set_index("ID")
    assert train.loc[moved, "path"] == str(data_copy / "phase1" / moved)
    assert len(read_splits(data_copy, LABELLED)) == sum(len(b) for s, b in before.items() if s in LABELLED)


def test_bad_rows_name_the_combined_file_and_nothing_is_half_written(data_copy, tmp_path):
    combined = tmp_path / "combined.csv"
    _combined(data_copy, combined)
    edit_csv(combined, lambda d: d.assign(split=list(d["split"][:4]) + ["holdout"] + list(d["split"][5:])))
    with pytest.raises(WBCError, match=r"combined.csv:6: split 'holdout' is none of .*--map holdout=<split>"):
        split_label_file(combined, data_copy)
    assert split_label_file(combined, data_copy, parse_map(["holdout=phase2_eval"]))["phase2_eval"] > 0
    for csv, _ in SPLITS.values():
        (data_copy / csv).unlink()
    df = pd.read_csv(combined, dtype=str, keep_default_na=False)
    n = int((df["split"] == "eval").to_numpy().nonzero()[0][1])  # the second eval row: its image removed
    (data_copy / df["img_dir"][n] / df["ID"][n]).unlink()
    with pytest.raises(WBCError, match=rf"combined.csv:{n + 2}: image not found"):
        split_label_file(combined, data_copy, parse_map(["holdout=phase2_eval"]))
    names = {csv for csv, _ in SPLITS.values()}
    assert not [p for p in data_copy.iterdir() if p.name in names or ".tmp" in p.name]  # none written, no temps
    with pytest.raises(WBCError, match=r"--map 'x': expected <value>=<split>"):
        parse_map(["x"])
