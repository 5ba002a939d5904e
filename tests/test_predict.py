"""Fold merging keyed by ID, probability files, and test-time augmentation averaging (unit level, no training)."""
import numpy as np
import pytest
import torch

from helpers import write_folds
from wbc.core.errors import WBCError
from wbc.core.io import Probs, load_probs, save_probs, write_text
from wbc.s4_predict.merge import merge_run

CLASSES = ["A", "B", "C"]


def _probs(rng, n):
    p = rng.random((n, len(CLASSES))) + 0.1
    return p / p.sum(1, keepdims=True)


def _fold_files(run, rng, oof_ids, test_ids):
    """fold<k>/{oof,test}.csv with random probabilities; each fold's test rows in its own order."""
    tests = {}
    for k, ids in enumerate(oof_ids):
        d = run / f"fold{k}"
        labels = np.array(CLASSES)[np.arange(len(ids)) % 3]
        save_probs(d / "oof.csv", Probs(ids, _probs(rng, len(ids)), CLASSES, np.full(len(ids), k), labels))
        order = rng.permutation(len(test_ids))
        tests[k] = Probs(np.asarray(test_ids)[order], _probs(rng, len(test_ids)), CLASSES, labels=[""] * len(test_ids))
        save_probs(d / "test.csv", tests[k])
    return tests


def test_merge_averages_test_probs_by_id_and_concatenates_oof(tmp_path):
    rng = np.random.default_rng(0)
    oof_ids = [["a", "b", "c"], ["d", "e", "f"]]
    test_ids = [f"t{i}" for i in range(6)]
    tests = _fold_files(tmp_path, rng, oof_ids, test_ids)
    rep = merge_run(tmp_path, expected_ids=sum(oof_ids, []))
    assert rep["oof_complete"] and rep["folds"] == [0, 1] and rep["n_oof"] == 6
    oof = load_probs(tmp_path / "oof.csv")
    for k, ids in enumerate(oof_ids):
        part = load_probs(tmp_path / f"fold{k}" / "oof.csv")
        np.testing.assert_allclose(oof.align(ids).probs, part.probs)  # each OOF row is its own fold's, by ID
        assert (oof.align(ids).folds == k).all()
    merged = load_probs(tmp_path / "test.csv")
    for i in test_ids:  # fold mean per ID, whatever each fold file's row order
        want = (tests[0].align([i]).probs + tests[1].align([i]).probs) / 2
        np.testing.assert_allclose(merged.align([i]).probs, want, atol=1e-12)


def test_merge_refuses_overlapping_oof_and_disagreeing_folds(tmp_path):
    rng = np.random.default_rng(1)
    _fold_files(tmp_path / "dup", rng, [["a", "b"], ["b", "c"]], ["t0", "t1"])
    with pytest.raises(WBCError, match="an ID appears in the OOF of two folds"):
        merge_run(tmp_path / "dup")
    _fold_files(tmp_path / "ids", rng, [["a", "b"], ["c", "d"]], ["t0", "t1"])
    save_probs(tmp_path / "ids" / "fold1" / "test.csv", Probs(["t0", "t9"], _probs(rng, 2), CLASSES))
    with pytest.raises(WBCError, match=r"fold1/test.csv: IDs differ from those of .*fold0/test.csv"):
        merge_run(tmp_path / "ids")
    _fold_files(tmp_path / "cls", rng, [["a", "b"], ["c", "d"]], ["t0", "t1"])
    save_probs(tmp_path / "cls" / "fold1" / "test.csv", Probs(["t0", "t1"], _probs(rng, 2), ["B", "A", "C"]))
    with pytest.raises(WBCError, match="fold1/test.csv: classes B,A,C differ from .*fold0/oof.csv's A,B,C"):
        merge_run(tmp_path / "cls")  # columns in another class order


def test_merge_refuses_oof_files_whose_class_columns_differ(tmp_path):
    rng = np.random.default_rng(2)
    _fold_files(tmp_path, rng, [["a", "b", "c"], ["d", "e", "f"]], ["t0", "t1"])
    one = load_probs(tmp_path / "fold1" / "oof.csv")
    save_probs(tmp_path / "fold1" / "oof.csv", Probs(one.ids, one.probs[:, ::-1], ["C", "B", "A"], one.folds,
                                                     one.labels))
    with pytest.raises(WBCError, match="fold1/oof.csv: classes C,B,A differ from .*fold0/oof.csv's A,B,C"):
        merge_run(tmp_path)
    assert not (tmp_path / "oof.csv").exists()


def test_merge_refuses_an_oof_file_without_folds(tmp_path):
    rng = np.random.default_rng(3)
    _fold_files(tmp_path, rng, [["a", "b"], ["c", "d"]], ["t0", "t1"])
    one = load_probs(tmp_path / "fold1" / "oof.csv")
    save_probs(tmp_path / "fold1" / "oof.csv", Probs(one.ids, one.probs, CLASSES, labels=one.labels))
    with pytest.raises(WBCError, match=r"fold1/oof.csv:1: missing column\(s\) fold"):
        merge_run(tmp_path)


def test_a_refused_merge_leaves_the_previous_merge_whole(tmp_path):
    rng = np.random.default_rng(4)
    _fold_files(tmp_path, rng, [["a", "b", "c"], ["d", "e", "f"]], ["t0", "t1"])
    merge_run(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    _fold_files(tmp_path, rng, [["a", "b", "c"], ["d", "e", "f"]], ["t0", "t1"])  # new OOF probabilities
    save_probs(tmp_path / "fold1" / "test.csv", Probs(["t0", "t9"], _probs(rng, 2), CLASSES))
    with pytest.raises(WBCError, match="folds disagree on IDs"):
        merge_run(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_probability_files_refuse_duplicate_ids(tmp_path):
    p = tmp_path / "p.csv"
    write_text(p, "ID,prob_A,prob_B\nx,0.5,0.5\ny,0.2,0.8\nx,0.1,0.9\n")
    with pytest.raises(WBCError, match=r"p.csv:4: duplicate ID x"):
        load_probs(p)


def test_tta_averages_the_softmax_of_the_dihedral_views():
    from wbc.models.inference import normalize, predict_probs, view

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    images = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    kw = dict(device=torch.device("cpu"), mean=mean, std=std, batch_size=2, amp="none")
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), mean, std)
    with torch.no_grad():
        per_view = [model(view(x, k)).softmax(1).numpy() for k in range(8)]
    for n in (1, 2, 4, 8):
        got = predict_probs(model, images, tta=n, **kw)
        np.testing.assert_allclose(got, np.mean(per_view[:n], 0), atol=1e-6)
    assert np.abs(per_view[0] - np.mean(per_view, 0)).max() > 1e-3  # the views really differ for this model


def test_normalize_maps_uint8_to_the_models_per_channel_scale():
    from wbc.models.inference import normalize

    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 2, 3).contiguous()
    x[:, 1] = 128  # channel-distinct values, so an RGB / BGR mix-up shows
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x, mean, std), ref)
    torch.testing.assert_close(normalize(x, np.array(mean), np.array(std)), ref)  # arrays as timm gives them


def test_fold_model_predicts_with_the_configured_tta(tmp_path):
    from wbc.core.config import CONFIG_DIR, load_config
    from wbc.core.io import torch_save
    from wbc.models.factory import create_model
    from wbc.s4_predict.fold import load_fold_model

    cfg = load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", ["predict.tta=4", "predict.batch_size=16"])
    torch_save(tmp_path / "best.pt", create_model({**cfg["model"], "pretrained": False}, 3).state_dict())
    model, kw = load_fold_model(cfg, tmp_path / "best.pt", 3, "cpu")
    assert kw["tta"] == 4 and kw["batch_size"] == 16 and kw["device"] == "cpu"
    assert load_fold_model(cfg, tmp_path / "best.pt", 3, "cpu", tta=2)[1]["tta"] == 2  # an explicit count wins


@pytest.mark.slow
def test_predict_weights_choose_the_checkpoint_and_changed_settings_redo_a_fold(sample_root, make_cfg):
    """`predict.weights=last` predicts with last.pt; a fold predicted with other weights or TTA is redone, one
    predicted with the same settings is kept, and folds predicted before settings were recorded count as best.pt."""
    from wbc.__main__ import main
    from wbc.core.io import torch_load, torch_save
    from wbc.core.run_folder import run_dir
    from wbc.models.inference import predict_probs
    from wbc.s3_train.inputs import Rows, load_fold_data
    from wbc.s3_train.loop import train_fold
    from wbc.s4_predict.fold import load_fold_model

    cfg = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=1", "predict.tta=1")
    write_folds(cfg)
    train_fold(cfg, 0)
    fold = run_dir(cfg) / "fold0"
    sd = torch_load(fold / "best.pt")
    bias = [k for k in sd if k.endswith("bias")][-1]  # the classifier's: last.pt now favours class 0
    sd[bias][0] += 5.0
    torch_save(fold / "last.pt", sd)
    cmd = ["predict", "-c", "configs/recipes/tiny_cpu.yaml", f"data.root={cfg['data']['root']}",
           f"output_dir={cfg['output_dir']}", f"data.cache_dir={cfg['data']['cache_dir']}",
           f"folds.file={cfg['folds']['file']}", "folds.n_folds=2", "train.epochs=1", "predict.tta=1"]

    def oof():
        return load_probs(fold / "oof.csv")

    assert main(cmd) == 0
    best, stamp = oof(), (fold / "oof.csv").stat().st_mtime_ns
    assert main(cmd) == 0 and (fold / "oof.csv").stat().st_mtime_ns == stamp  # same settings: kept
    assert main(cmd + ["predict.weights=ema"]) == 2 and (fold / "oof.csv").stat().st_mtime_ns == stamp
    assert main(cmd + ["predict.weights=last"]) == 0
    last = oof().align(best.ids)
    assert last.probs[:, 0].mean() > best.probs[:, 0].mean() + 0.3
    data = load_fold_data(cfg)  # and they are last.pt's probabilities, image by image
    model, kw = load_fold_model(cfg, fold / "last.pt", len(data.classes), torch.device("cpu"))
    va = np.flatnonzero(data.pool["fold"].to_numpy() == 0)
    want = predict_probs(model, Rows(data.pool_images, va), **kw)
    np.testing.assert_allclose(last.align(data.pool["ID"].to_numpy()[va]).probs, want, atol=1e-6)
    (fold / "prediction.json").unlink()  # as a fold predicted before the record existed: taken as best.pt
    assert main(cmd + ["predict.weights=last"]) == 0
    assert (fold / "prediction.json").exists()
    stamp = (fold / "oof.csv").stat().st_mtime_ns
    assert main(cmd + ["predict.weights=last", "predict.tta=2"]) == 0
    assert (fold / "oof.csv").stat().st_mtime_ns > stamp  # another TTA: redone


def test_an_unlabelled_eval_split_gets_no_score(tmp_path):
    from wbc.core.metrics import summary

    rng = np.random.default_rng(1)
    _fold_files(tmp_path, rng, [["a", "b", "c"], ["d", "e", "f"]], ["t0", "t1"])
    for k in (0, 1):  # eval predictions without labels (a hold-out whose labels are withheld)
        save_probs(tmp_path / f"fold{k}" / "eval.csv", Probs(["e0", "e1"], _probs(rng, 2), CLASSES, labels=["", ""]))
    rep = merge_run(tmp_path)
    assert "eval" not in rep and (tmp_path / "eval.csv").exists() and not (tmp_path / "confusion_eval.png").exists()
    empty = summary([], [], CLASSES)
    assert empty["macro_f1"] == 0.0 and empty["per_class_f1"] == {c: 0.0 for c in CLASSES} and empty["n"] == 0
