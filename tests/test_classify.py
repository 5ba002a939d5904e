"""`classify`: a run's fold models on image files outside the dataset layout give the same probabilities as
`make predict` gives the same images in the test split; bad inputs are refused naming the file."""
import shutil

import numpy as np
import pandas as pd
import pytest

from helpers import write_folds
from wbc.core.errors import WBCError
from wbc.core.io import load_probs
from wbc.core.run_folder import run_dir
from wbc.s1_data.layout import read_split
from wbc.s3_train.inputs import load_fold_data
from wbc.s3_train.loop import train_fold
from wbc.s4_predict.classify import classify, list_images
from wbc.s4_predict.fold import predict_fold


@pytest.mark.slow
def test_classify_matches_the_test_split_predictions(sample_root, make_cfg, tmp_path):
    cfg = make_cfg(sample_root, "folds.n_folds=2", "data.image_size=32", "train.epochs=1", "predict.tta=2",
                   "data.center_crop=0.8")
    write_folds(cfg)
    data = load_fold_data(cfg)
    for fold in (0, 1):
        train_fold(cfg, fold, data=data)
        predict_fold(cfg, fold, data)
    test = read_split(sample_root, "phase2_test")
    imgs = tmp_path / "imgs"
    (imgs / "more").mkdir(parents=True)
    for i, r in test.head(6).iterrows():
        shutil.copy(r["path"], imgs / ("more" if i % 2 else "") / r["ID"])
    (imgs / "notes.txt").write_text("not an image")

    res = classify(cfg, [imgs])
    assert res.equals(pd.read_csv(run_dir(cfg) / "classified.csv", keep_default_na=False))
    ids = [i.split("/")[-1] for i in res["ID"]]
    assert sorted(ids) == sorted(test["ID"].head(6)) and sum(i.startswith("more/") for i in res["ID"]) == 3
    # the test split's predictions: the folds' mean, as make predict merges them
    folds = [load_probs(run_dir(cfg) / f"fold{k}" / "test.csv").align(np.array(ids)) for k in (0, 1)]
    expected = (folds[0].probs + folds[1].probs) / 2
    got = res[[f"prob_{c}" for c in folds[0].classes]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert (res["prediction"] == np.asarray(folds[0].classes)[expected.argmax(1)]).all()

    # with test-time BatchNorm adaptation, the whole test split classified as make predict adapts to it
    every = tmp_path / "every"
    every.mkdir()
    for path in test["path"]:
        shutil.copy(path, every)
    bn = {**cfg, "predict": {**cfg["predict"], "adapt_bn": 1.0}}
    for fold in (0, 1):
        predict_fold(bn, fold, data)
    adapted = classify(bn, [every], out=tmp_path / "adapted.csv")
    folds = [load_probs(run_dir(cfg) / f"fold{k}" / "test.csv").align(adapted["ID"].to_numpy()) for k in (0, 1)]
    np.testing.assert_allclose(adapted[[f"prob_{c}" for c in folds[0].classes]].to_numpy(),
                               (folds[0].probs + folds[1].probs) / 2, atol=1e-4)
    plain = classify(cfg, [every], out=tmp_path / "plain.csv")
    assert not np.allclose(plain.filter(like="prob_").to_numpy(), adapted.filter(like="prob_").to_numpy(), atol=1e-3)

    (imgs / "more" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(WBCError, match=r"unreadable image: .*more/broken.jpg"):
        classify(cfg, [imgs], out=tmp_path / "never.csv")
    assert not (tmp_path / "never.csv").exists()


def test_classify_refuses_bad_inputs(tmp_path, sample_root, make_cfg):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(WBCError, match="no images"):
        list_images([tmp_path / "a"])
    with pytest.raises(WBCError, match="nope: no such file or folder"):
        list_images([tmp_path / "nope"])
    (tmp_path / "a" / "x.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "b" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(WBCError, match=r"ID x.jpg twice: .*a/x.jpg and .*b/x.jpg"):
        list_images([tmp_path / "a" / "x.jpg", tmp_path / "b"])
    cfg = make_cfg(sample_root, "name=untrained")
    with pytest.raises(WBCError, match="no fold\\*/best.pt to classify with"):
        classify(cfg, [tmp_path / "a"])
    with pytest.raises(WBCError, match=r"--out .*/b: a folder; give the CSV file to write"):
        classify(cfg, [tmp_path / "a"], tmp_path / "b")
