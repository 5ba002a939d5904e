"""`crosslab`: another lab's labelled cells scored with a label map; a collapse onto one class is named."""
import numpy as np
import pandas as pd
import pytest

from wbc.core.errors import WBCError
from wbc.optional.crosslab import COARSE, crosslab, label_map, read_labels, score


def test_score_names_a_collapse_and_counts_unmapped_predictions_as_wrong():
    true = np.array(["NEU"] * 6 + ["MO"] * 2 + ["LY"] * 2)
    pred = np.array(["MO"] * 5 + ["other"] + ["MO", "MO", "LY", "LY"])  # neutrophils called monocytes
    r = score(true, pred, ["LY", "MO", "NEU"])
    assert r["collapsed_onto"] == ["MO"] and r["predicted"] == {"MO": 7, "LY": 2, "other": 1}
    assert r["per_class"]["NEU"]["recall"] == 0 and r["per_class"]["MO"]["precision"] == pytest.approx(2 / 7)
    assert r["macro_f1"] == pytest.approx(np.mean([1.0, 2 * (2 / 7) / (2 / 7 + 1), 0.0]))
    assert r["accuracy"] == pytest.approx(0.4)
    assert score(true, true, ["LY", "MO", "NEU"])["collapsed_onto"] == []


def test_label_maps_and_label_files(tmp_path):
    assert label_map("coarse") == COARSE and COARSE["BNE"] == COARSE["SNE"] == "NEU" and "MY" not in COARSE
    assert label_map("none") is None
    (tmp_path / "m.yaml").write_text("SNE: N\nLY: L\n")
    assert label_map(str(tmp_path / "m.yaml")) == {"SNE": "N", "LY": "L"}
    with pytest.raises(WBCError, match="not coarse, none or a YAML file"):
        label_map("fine")
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"ID": ["a.jpg", "b.jpg"], "labels": ["NEU", "LY"]}).to_csv(csv, index=False)
    assert read_labels(csv, ["b.jpg", "a.jpg"]).to_dict() == {"a.jpg": "NEU", "b.jpg": "LY"}
    with pytest.raises(WBCError, match=r"labels.csv:3: no image b.jpg in the folder"):
        read_labels(csv, ["a.jpg"])
    with pytest.raises(WBCError, match=r"labels.csv: 1 images without a row, e.g. c.jpg"):
        read_labels(csv, ["a.jpg", "b.jpg", "c.jpg"])


@pytest.mark.slow
def test_a_run_on_a_labelled_folder(cfg2, tmp_path):
    """A trained run's fold models on the sample's eval images as another lab's folder, with the fine labels and
    with a coarse map of them; report, predictions and confusion picture are written."""
    import json
    import shutil

    from wbc.core.run_folder import run_dir
    from wbc.s3_train.inputs import load_fold_data
    from wbc.s3_train.loop import train_fold
    from wbc.s4_predict.fold import predict_fold

    cfg = cfg2("train.epochs=1", "predict.tta=1")
    data = load_fold_data(cfg)
    for k in (0, 1):
        train_fold(cfg, k, data=data)
        predict_fold(cfg, k, data)
    lab = tmp_path / "lab"
    shutil.copytree(data.holdout["path"].iloc[0].rsplit("/", 1)[0], lab / "images")
    data.holdout[["ID", "labels"]].to_csv(lab / "labels.csv", index=False)
    rep = crosslab(run_dir(cfg), lab / "images", lab / "labels.csv", "none", out=tmp_path / "x")
    assert rep["n"] == len(data.holdout) and sum(rep["predicted"].values()) == rep["n"]
    saved = json.loads((tmp_path / "x" / "report.json").read_text())
    assert saved["macro_f1"] == pytest.approx(rep["macro_f1"]) and (tmp_path / "x" / "confusion.png").exists()
    pred = pd.read_csv(tmp_path / "x" / "predictions.csv", keep_default_na=False)
    assert (pred["predicted"] == pred["predicted_fine"]).all()
    classes = sorted(set(data.holdout["labels"]))
    (tmp_path / "two.yaml").write_text("\n".join(f"{c}: {'A' if i % 2 else 'B'}" for i, c in enumerate(classes)))
    coarse = pd.DataFrame({"ID": data.holdout["ID"],
                           "labels": ["A" if classes.index(c) % 2 else "B" for c in data.holdout["labels"]]})
    coarse.to_csv(lab / "coarse.csv", index=False)
    rep2 = crosslab(run_dir(cfg), lab / "images", lab / "coarse.csv", str(tmp_path / "two.yaml"),
                    out=tmp_path / "y")
    assert set(rep2["per_class"]) == {"A", "B"} and rep2["accuracy"] >= rep["accuracy"]  # merging classes helps
    with pytest.raises(WBCError, match=r"label\(s\) A, B are none the map \(none\) can predict"):
        crosslab(run_dir(cfg), lab / "images", lab / "coarse.csv", "none", out=tmp_path / "z")
