"""A real (tiny) training run on CPU: it learns, it resumes exactly, its OOF covers the pool."""
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from wbc.config import run_dir
from wbc.errors import WBCError
from wbc.folds import build_folds
from wbc.io import load_probs, torch_load, write_csv
from wbc.predict.fold import predict_fold
from wbc.predict.merge import merge_run
from wbc.train.inputs import load_fold_data
from wbc.train.loop import StopTraining, train_fold


@pytest.fixture
def cfg2(sample_root, make_cfg):
    """Two folds, so a test can cover the whole pool quickly; 32 px unless a test asks for more."""
    def make(*overrides):
        cfg = make_cfg(sample_root, "folds.n_folds=2", "data.image_size=32", *overrides)
        write_csv(cfg["folds"]["file"], build_folds(cfg))
        return cfg
    return make


def test_learns_above_chance(cfg2):
    cfg = cfg2("train.epochs=6")
    res = train_fold(cfg, 0)
    hist = res["history"]
    n_cls = len(load_fold_data(cfg).classes)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert res["best_macro_f1"] > 2.0 / n_cls  # chance is ~1/n_classes
    lines = (run_dir(cfg) / "fold0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(6))
    sd = torch.load(run_dir(cfg) / "fold0" / "best.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


def _full_and_resumed(cfg2, over, kill_at):
    """Trains `over` uninterrupted, and again killed after epoch `kill_at` and resumed; both must end with the same
    last.pt. Returns both configs and the resumed run's result."""
    full = cfg2(*over, "name=full")
    data = load_fold_data(full)
    train_fold(full, 0, data=data)
    part = cfg2(*over, "name=part")

    def kill(epoch, rec):
        if epoch == kill_at:
            raise StopTraining

    with pytest.raises(StopTraining):
        train_fold(part, 0, on_epoch=kill, data=data)
    assert torch_load(run_dir(part) / "fold0" / "state.pt")["epoch"] == kill_at
    res = train_fold(part, 0, resume=True, data=data)
    a, b = (torch_load(run_dir(c) / "fold0" / "last.pt") for c in (full, part))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return full, part, res


def test_resume_is_exact(cfg2):
    # EMA, a stage-2 classifier re-training, augmentation and drop-path (the global RNG) all have state that must
    # survive a kill.
    over = ["train.epochs=3", "train.stage2.epochs=1", "train.ema=true", "train.ema_decay=0.9",
            "train.loss.type=focal", "train.sampler.type=balanced", "train.num_workers=1", "model.drop_path_rate=0.2"]
    full, part, _ = _full_and_resumed(cfg2, over, kill_at=1)
    ma = [json.loads(x) for x in (run_dir(full) / "fold0" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (run_dir(part) / "fold0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_macro_f1"] for m in ma] == [m["val_macro_f1"] for m in mb]
    assert [m["stage"] for m in mb] == [1, 1, 1, 2]
    prior = json.loads((run_dir(full) / "fold0" / "train_result.json").read_text())["prior_correction"]
    assert prior["stage1"]["total"] == pytest.approx(1.0) and prior["stage2"]["total"] == pytest.approx(1.0)  # balanced


def test_a_fresh_start_replaces_the_folds_earlier_results(cfg2, monkeypatch):
    """Killed before its first save, a fresh run must leave nothing of an older run to resume or to predict with."""
    import wbc.train.loop as loop

    cfg = cfg2("train.epochs=1")
    out = run_dir(cfg) / "fold0"
    out.mkdir(parents=True)
    for name in loop.FOLD_RESULTS + ("unrelated.txt",):
        (out / name).write_text("an older run's")

    def killed(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_record_environment", killed)  # the first thing after the start: a kill there
    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 0)
    assert sorted(p.name for p in out.iterdir()) == ["unrelated.txt"]
    with pytest.raises(KeyboardInterrupt):  # a resume with nothing to resume is a fresh start too
        train_fold(cfg, 0, resume=True)


def test_oof_covers_pool_and_merges(cfg2):
    cfg = cfg2("train.epochs=1", "predict.tta=8")
    data = load_fold_data(cfg)
    for k in (0, 1):
        train_fold(cfg, k, data=data)
        predict_fold(cfg, k, data)
    folds = pd.read_csv(cfg["folds"]["file"], dtype=str)
    rep = merge_run(run_dir(cfg), expected_ids=folds["ID"])
    assert rep["oof_complete"]
    pred = np.asarray(load_probs(run_dir(cfg) / "oof.csv").probs.argmax(1))
    assert list(rep["oof"]["predicted"].values()) == np.bincount(pred, minlength=len(data.classes)).tolist()
    assert sum(rep["oof"]["support"].values()) == sum(rep["oof"]["predicted"].values()) == len(folds)
    oof = load_probs(run_dir(cfg) / "oof.csv")
    assert sorted(oof.ids) == sorted(folds["ID"]) and len(set(oof.ids)) == len(oof.ids)
    fmap = dict(zip(folds["ID"], folds["fold"].astype(int)))
    assert all(fmap[i] == f for i, f in zip(oof.ids, oof.folds))
    lmap = dict(zip(folds["ID"], folds["labels"]))
    assert all(lmap[i] == lbl for i, lbl in zip(oof.ids, oof.labels))  # each row's truth is its own image's
    np.testing.assert_allclose(oof.probs.sum(1), 1, atol=1e-5)
    test = load_probs(run_dir(cfg) / "test.csv")
    assert sorted(test.ids) == sorted(data.test["ID"])
    f0, f1 = (load_probs(run_dir(cfg) / f"fold{k}" / "test.csv").align(test.ids).probs for k in (0, 1))
    np.testing.assert_allclose(test.probs, (f0 + f1) / 2, atol=1e-6)  # fold mean
    ev = load_probs(run_dir(cfg) / "eval.csv")
    assert sorted(ev.ids) == sorted(data.holdout["ID"]) and "eval" in rep
    assert (run_dir(cfg) / "confusion_oof.png").stat().st_size > 1000

    from wbc.submit import submit_from_predictions

    sub = submit_from_predictions(run_dir(cfg), cfg["data"]["root"], "t", data.classes,
                                  out_dir=run_dir(cfg) / "subs")
    got = pd.read_csv(sub, dtype=str)
    want = np.asarray(test.classes)[test.probs.argmax(1)]
    assert dict(zip(got["ID"], got["labels"])) == dict(zip(test.ids, want))
    side = json.loads(sub.with_suffix(".json").read_text())
    assert side["cv_macro_f1"] == rep["oof"]["macro_f1"] and side["folds"] == [0, 1]


def test_tta_views_are_the_dihedral_group():
    from wbc.models.inference import view

    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = {tuple(view(x, k).flatten().tolist()) for k in range(8)}
    assert len(views) == 8


def test_epoch_tagged_sampler_and_dataset_seeding():
    from wbc.data.dataset import CellDataset, EpochTagged
    from wbc.train.sampling import build_sampler

    plain = EpochTagged(20, seed=3)
    plain.set_epoch(1)
    a = list(plain)
    assert sorted(i for _, i in a) == list(range(20)) and {e for e, _ in a} == {1}
    assert a == list(plain)  # a pure function of (seed, epoch)
    plain.set_epoch(2)
    assert [i for _, i in plain] != [i for _, i in a]
    weighted = EpochTagged(20, build_sampler(np.arange(20) % 2, 2, {"type": "balanced"}, seed=0), 0)
    weighted.set_epoch(5)
    assert len(list(weighted)) == 20 and all(e == 5 for e, _ in weighted)

    import albumentations as A

    imgs = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    ds = CellDataset(imgs, [0, 1, 0, 1], A.Compose([A.RandomRotate90(p=1), A.GaussNoise(p=1)]), seed=0)
    x1, x2, x3 = ds[(3, 1)][0], ds[(3, 1)][0], ds[(4, 1)][0]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_stain_normalised_cache(cfg2):
    cfg = cfg2("data.stain_norm=true")
    plain = load_fold_data(cfg2())
    normed = load_fold_data(cfg)
    from wbc.data.cache import cache_dir

    ref = cache_dir(cfg) / "stain_reference.json"
    assert ref.exists() and "_stain-" in cache_dir(cfg).name
    for split in ("phase1", "phase2_train"):  # every split went through the normaliser
        rows = (normed.pool["split"] == split).to_numpy()
        assert np.abs(normed.pool_images[rows].astype(int) - plain.pool_images[rows].astype(int)).mean() > 1.0
    stamp = ref.stat().st_mtime_ns
    again = load_fold_data(cfg)  # the cache is reused: no refit
    assert ref.stat().st_mtime_ns == stamp and np.array_equal(again.pool_images, normed.pool_images)


def test_worker_count_does_not_change_training(cfg2):
    """In-process loading (num_workers 0) and persistent workers train the same model: augmentation is seeded per
    sample, and the loader no longer takes a seed from the global RNG (drop-path's) at every in-process epoch."""
    over = ["train.epochs=3", "model.drop_path_rate=0.2", "train.stage2.epochs=1"]
    runs = {}
    for nw in (0, 1):
        cfg = cfg2(*over, f"train.num_workers={nw}", f"name=nw{nw}")
        train_fold(cfg, 0)
        runs[nw] = torch_load(run_dir(cfg) / "fold0" / "last.pt")
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_ema_warmup_forgets_the_initial_weights(cfg2):
    # EMA is a passive average: the same seed trains the same model, only the averaged weights differ.
    over = ["train.epochs=2", "train.ema_decay=0.999", "train.warmup_epochs=0"]

    def params(*extra):
        cfg = cfg2(*over, *extra)
        train_fold(cfg, 0)
        sd = torch_load(run_dir(cfg) / "fold0" / "last.pt")
        return torch.cat([v.flatten().float() for k, v in sd.items() if "running" not in k and "num_batches" not in k])

    init = params("train.ema=false", "train.lr=1e-12", "train.min_lr=0", "name=init")  # weights stay as initialised
    plain = params("train.ema=false", "name=plain")
    flat = params("train.ema=true", "train.ema_warmup=false", "name=flat")
    warm = params("train.ema=true", "train.ema_warmup=true", "name=warm")
    moved = (plain - init).norm()
    assert (flat - init).norm() < 0.25 * moved  # 0.999 per step: still mostly the initial weights (0.12 seen)
    assert (warm - init).norm() > 0.6 * moved and (warm - plain).norm() < 0.3 * moved  # 0.88 and 0.15 seen


def test_resume_skips_a_finished_fold(cfg2, capsys):
    """`RESUME=1 make train-all` after a killed call: finished folds are neither retrained nor re-predicted, but a
    fold restarted since its predictions (env.json rewritten at every start) is not taken as finished."""
    from wbc.__main__ import main

    cfg = cfg2("train.epochs=1", "predict.tta=1")
    args = ["train-fold", "-c", "configs/tiny_cpu.yaml", "--fold", "0", f"data.root={cfg['data']['root']}",
            f"output_dir={cfg['output_dir']}", f"data.cache_dir={cfg['data']['cache_dir']}",
            f"folds.file={cfg['folds']['file']}", "folds.n_folds=2", "train.epochs=1", "predict.tta=1"]
    assert main(args) == 0
    out = run_dir(cfg) / "fold0"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    (out / "env.json").write_text((out / "env.json").read_text())  # a fresh start killed before its first epoch
    assert main(args + ["--resume"]) == 0
    assert "nothing to resume" not in capsys.readouterr().out
    assert (out / "oof.csv").stat().st_mtime_ns > stamps["oof.csv"]  # predicted again


def test_training_steps_never_wait_for_the_device(cfg2, monkeypatch):
    """A GPU stays busy only while the host queues steps ahead of it, so a step must not read a value back
    (`.item()`: the running loss stays on the device) nor copy constants host-to-device (the normalisation
    statistics and Remix's class counts are built once). Counted here on the CPU, inside the training epochs."""
    import wbc.data.dataset as dataset
    import wbc.train.loop as loop

    cfg = cfg2("train.epochs=2", "train.mix.mixup_alpha=0.4", "train.mix.remix_kappa=3")
    counts = {"item": 0, "as_tensor": 0, "steps": 0, "epochs": 0}
    inside = [False]

    def counting(name, real):
        def f(*a, **k):  # calls from this package only: torch's AdamW reads its CPU step counters by design
            counts[name] += inside[0] and "/wbc/" in sys._getframe(1).f_code.co_filename.replace("\\", "/")
            return real(*a, **k)
        return f

    monkeypatch.setattr(torch.Tensor, "item", counting("item", torch.Tensor.item))
    monkeypatch.setattr(torch, "as_tensor", counting("as_tensor", torch.as_tensor))
    real_epoch = loop._train_epoch

    def epoch(*a, **k):
        counts["steps"] += a[4]  # n_batches
        counts["epochs"] += 1
        inside[0] = True
        try:
            return real_epoch(*a, **k)
        finally:
            inside[0] = False

    monkeypatch.setattr(loop, "_train_epoch", epoch)
    before = dataset._stats.cache_info()
    res = train_fold(cfg, 0)
    after = dataset._stats.cache_info()
    assert counts["epochs"] == 2 and counts["steps"] >= 8
    assert counts["item"] == 0  # the epoch's loss is read once, by float(), at its end
    assert counts["as_tensor"] <= counts["epochs"]  # one Mixer per epoch copies its class counts once
    assert after.hits + after.misses - before.hits - before.misses >= counts["steps"]
    assert after.misses - before.misses <= 1
    assert all(np.isfinite(h["train_loss"]) for h in res["history"])


def test_one_loader_iterator_serves_each_stage(cfg2, monkeypatch):
    """The workers prefetch across epoch boundaries (and during validation) only if a stage keeps one iterator:
    3 + 2 epochs make two, each taking the loader's seed at its stage's first epoch."""
    import wbc.train.loop as loop
    from wbc.data.dataset import EpochTagged, StageBatches

    made = []
    real = loop._batches
    monkeypatch.setattr(loop, "_batches", lambda loader, draw_seed: made.append(draw_seed) or real(loader, draw_seed))
    res = train_fold(cfg2("train.epochs=3", "train.stage2.epochs=2", "train.num_workers=1"), 0)
    assert made == [True, True] and [h["stage"] for h in res["history"]] == [1, 1, 1, 2, 2]

    tagged = EpochTagged(10, seed=3)
    stream = list(StageBatches(tagged, 4, first=2, end=4))
    assert len(stream) == len(StageBatches(tagged, 4, 2, 4)) == 4  # two full batches of 4 per 10-image epoch
    for epoch, batches in ((2, stream[:2]), (3, stream[2:])):
        tagged.set_epoch(epoch)
        assert sum(batches, []) == list(tagged)[:8]  # that epoch's own draw, its partial batch dropped


def test_several_folds_in_one_process_match_separate_runs(cfg2, capsys):
    """`make train-all` trains its folds in one process (`--fold 0,1`): each fold is seeded afresh, so fold 1
    after fold 0 is the fold 1 of a run of its own."""
    from wbc.__main__ import main

    cfg = cfg2("train.epochs=2", "model.drop_path_rate=0.2", "train.num_workers=1", "predict.tta=1")
    base = ["-c", "configs/tiny_cpu.yaml", f"data.root={cfg['data']['root']}", f"output_dir={cfg['output_dir']}",
            f"data.cache_dir={cfg['data']['cache_dir']}", f"folds.file={cfg['folds']['file']}", "folds.n_folds=2",
            "train.epochs=2", "model.drop_path_rate=0.2", "train.num_workers=1", "predict.tta=1"]
    assert main(["train-fold", "--fold", "1", *base, "name=apart"]) == 0
    assert main(["train-fold", "--fold", "0,1", *base, "name=together"]) == 0
    out = run_dir(cfg).parent
    a, b = torch_load(out / "apart" / "fold1" / "last.pt"), torch_load(out / "together" / "fold1" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(pd.read_csv(out / "apart" / "fold1" / "oof.csv"),
                                  pd.read_csv(out / "together" / "fold1" / "oof.csv"))
    assert (out / "together" / "fold0" / "oof.csv").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["train-fold", "--fold", "0,x", *base])
    assert e.value.code == 2 and "integers separated by commas" in capsys.readouterr().err


def test_checkpoints_every_so_often_keep_the_same_best_and_last(cfg2):
    """`train.checkpoint_every_s`: resume checkpoints only that often and at each stage's end, the best weights
    kept in memory meanwhile; the files at the end are those of a run that saved every epoch."""
    over = ["train.epochs=3", "train.stage2.epochs=1", "train.ema=true", "train.ema_decay=0.9"]
    every = cfg2(*over, "name=every")
    train_fold(every, 0)
    seen = []

    def look(epoch, rec):
        p = run_dir(rare) / "fold0" / "state.pt"
        seen.append(torch_load(p)["epoch"] if p.exists() else None)

    rare = cfg2(*over, "train.checkpoint_every_s=1e9", "name=rare")
    train_fold(rare, 0, on_epoch=look)
    assert seen == [None, None, 2, 3]  # stage 1 ends at epoch 2, the run at 3
    for name in ("best.pt", "last.pt"):
        a, b = torch_load(run_dir(every) / "fold0" / name), torch_load(run_dir(rare) / "fold0" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    hist = [json.loads(x) for x in (run_dir(rare) / "fold0" / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 4


def test_shared_memory_check_warns_before_workers_would_die(tmp_path, capsys):
    """Loader workers pass batches through /dev/shm, 64 MB in many containers: the check names the shortfall."""
    from wbc.train.loop import check_shared_memory

    free = __import__("shutil").disk_usage(tmp_path).free
    assert check_shared_memory(12, 10, shm=str(tmp_path))  # 12 workers x 4 batches x 10 bytes, x 2 to spare
    assert check_shared_memory(0, free, shm=str(tmp_path))  # in-process loading needs none
    assert check_shared_memory(4, free, shm=str(tmp_path / "missing"))  # nothing to check
    capsys.readouterr()
    assert not check_shared_memory(12, free // 50, shm=str(tmp_path))
    assert "lower train.num_workers" in capsys.readouterr().out


@pytest.mark.parametrize("stage, recipe", [
    (1, {"loss": {"type": "logit_adjusted", "tau": 0.5},
         "mix": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "remix_kappa": 3}}),
    (1, {"loss": {"type": "focal", "class_weight": "effective"}}),
    (1, {"loss": {"type": "balanced_softmax"}, "consistency": {"weight": 2.0, "views": 2}}),
    (2, {"loss": {"type": "logit_adjusted", "tau": 1.0}}),
], ids=["logit_adjusted+mix", "focal+weights", "balanced_softmax+consistency", "stage2"])
def test_a_training_batch_stays_on_the_device(stage, recipe):
    """No GPU here, so a fake CUDA device (PyTorch's FakeTensorMode: shapes and devices, no data) runs a batch's
    way to its loss as the trainer builds it; a buffer, count or constant left on the CPU raises a device mismatch,
    as on a GPU. (The trainer's loss used to stay on the CPU: its first GPU step would have failed.) Backward,
    the optimizer and timm's EMA need a real CUDA runtime, so they are left out."""
    import timm
    from torch._subclasses.fake_tensor import FakeTensorMode

    import wbc.data.dataset as dataset
    from wbc.config import CONFIG_DIR, load_config
    from wbc.train.loop import _batch_loss, stage_loss
    from wbc.train.mix import build_mixer

    t = load_config(CONFIG_DIR / "base.yaml", [])["train"]
    t = {**t, **{k: ({**t[k], **v} if isinstance(v, dict) else v) for k, v in recipe.items()}, "epochs": 3,
         "amp": "none"}
    counts, device = np.array([50, 20, 5, 1]), torch.device("cuda")
    dataset._stats.cache_clear()  # fake constants must not outlive the fake mode
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            with device:  # made there: converting a module's parameters to fake tensors is not supported
                model = timm.create_model("test_resnet", num_classes=4)
            loss_fn = stage_loss(t, counts, stage, device)
            views = int(t["consistency"]["views"]) if t["consistency"]["weight"] > 0 else 0
            x = torch.randint(0, 255, (8, *([views] if views else []), 3, 32, 32), dtype=torch.uint8)  # as loaded
            y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
            mixer = build_mixer(t, counts, 0, 0) if stage == 1 else None
            norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
            loss = _batch_loss(model, model, x, y, loss_fn, device, norm, t, stage, mixer, channels_last=True)
            assert loss.device == torch.device("cuda", 0) and loss.shape == ()
    finally:
        dataset._stats.cache_clear()


def test_warmup_then_cosine_to_min_lr():
    from wbc.train.loop import _lr_lambda

    f = _lr_lambda(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warm-up
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # held at the floor


def test_gradient_clipping_bounds_the_step():
    from wbc.train.loop import _train_step
    from wbc.train.losses import build_loss

    def step(clip):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        x = torch.full((4, 3, 4, 4), 255, dtype=torch.uint8)
        y = torch.tensor([0, 1, 2, 0])
        norm = {"mean": (0.0, 0.0, 0.0), "std": (0.01, 0.01, 0.01)}  # huge inputs: huge gradients
        _train_step(model, model, None, x, y, opt, sched, scaler, build_loss({"type": "ce"}, [1, 1, 1]),
                    torch.device("cpu"), norm, {"grad_clip": clip, "amp": "none"}, 1)
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()

    assert step(0.5) == pytest.approx(0.5, rel=1e-4)  # SGD with lr 1 moves by the clipped gradient norm
    assert step(None) > 10


def test_best_checkpoint_follows_val_macro_f1_and_survives_a_resume(cfg2, monkeypatch):
    """best.pt holds the weights of the best validation macro-F1 (scripted here), also across a kill and resume:
    the resumed run must remember the best score, or a worse epoch would overwrite best.pt."""
    import wbc.train.loop as loop

    scores = iter([0.5, 0.7, 0.6, 0.4])
    monkeypatch.setattr(loop, "macro_f1", lambda *a: next(scores))
    cfg = cfg2("train.epochs=4", "train.ema=false")
    lasts = {}

    def snap(epoch, rec):
        lasts[epoch] = torch_load(run_dir(cfg) / "fold0" / "last.pt")
        if epoch == 2:
            raise StopTraining

    with pytest.raises(StopTraining):
        train_fold(cfg, 0, on_epoch=snap)
    res = train_fold(cfg, 0, on_epoch=snap, resume=True)
    assert res["best_macro_f1"] == 0.7 and [h["val_macro_f1"] for h in res["history"]] == [0.5, 0.7, 0.6, 0.4]
    best = torch_load(run_dir(cfg) / "fold0" / "best.pt")
    assert all(torch.equal(best[k], lasts[1][k]) for k in best)  # epoch 1's weights
    assert not all(torch.equal(best[k], lasts[3][k]) for k in best)
    # predictions come from best.pt by default, from the last epoch's weights with predict.weights=last
    data = load_fold_data(cfg)
    oof = {}
    for w in ("last", "best", None):
        predict_fold({**cfg, "predict": {**cfg["predict"], "weights": w}} if w else cfg, 0, data)
        oof[w] = load_probs(run_dir(cfg) / "fold0" / "oof.csv").probs
    np.testing.assert_array_equal(oof[None], oof["best"])
    assert np.abs(oof[None] - oof["last"]).max() > 1e-4


def test_stage2_retrains_the_head_on_the_frozen_backbone_with_balanced_sampling(cfg2, monkeypatch):
    import wbc.train.loop as loop
    from wbc.train.loop import stage_loss

    kinds = []
    real = loop.build_sampler
    monkeypatch.setattr(loop, "build_sampler", lambda y, n, c, **k: kinds.append(c["type"]) or real(y, n, c, **k))
    cfg = cfg2("train.epochs=1", "train.stage2.epochs=1", "train.ema=false", "train.sampler.type=sqrt")
    snaps = {}
    train_fold(cfg, 0, on_epoch=lambda e, r: snaps.__setitem__(e, torch_load(run_dir(cfg) / "fold0" / "last.pt")))
    assert kinds == ["sqrt", "balanced"]
    head = {n for n in snaps[0] if n.startswith("fc.")}  # test_resnet's classifier
    assert head and all(torch.equal(snaps[0][k], snaps[1][k]) for k in snaps[0] if k not in head)  # incl. BN stats
    assert not all(torch.equal(snaps[0][k], snaps[1][k]) for k in head)
    # stage 2's loss: plain CE (no weights, no prior offset) that keeps the recipe's label smoothing
    t = {"loss": {"type": "logit_adjusted", "tau": 1.0, "class_weight": "inverse", "label_smoothing": 0.1}}
    s2 = stage_loss(t, [50, 5, 1], 2, torch.device("cpu"))
    assert s2.label_smoothing == 0.1 and torch.equal(s2.weight, torch.ones(3)) and not s2.logit_offset.any()


def test_cache_is_rebuilt_when_ids_change_and_never_half_written(sample_root, make_cfg):
    from wbc.data.cache import cache_dir, split_images
    from wbc.data.layout import read_split

    cfg = make_cfg(sample_root)
    df = read_split(sample_root, "phase1")
    a = np.array(split_images(cfg, df.iloc[:6], "phase1"))
    b = np.array(split_images(cfg, df.iloc[2:8], "phase1"))  # other IDs: rebuilt, not the stale array
    assert len(b) == 6 and np.array_equal(b[:4], a[2:6]) and not np.array_equal(b, a)

    class Failing(np.ndarray):
        def tofile(self, path):  # a disk that fills up mid-write
            with open(path, "wb") as fh:
                fh.write(b"partial")
            raise OSError("disk full")

    with pytest.raises(OSError):
        split_images(cfg, df.iloc[:3], "phase1", transform=lambda im, split: im.view(Failing))
    assert sorted(p.name for p in cache_dir(cfg).iterdir()) == ["phase1.ids.json", "phase1.u8"]
    assert np.array_equal(split_images(cfg, df.iloc[2:8], "phase1"), b)  # the previous cache is intact


def test_cache_is_rebuilt_when_an_image_file_is_replaced(sample_root, make_cfg, tmp_path):
    """Same IDs, new pixels (a regenerated sample set, a re-released split): the cache must not serve the old ones."""
    import shutil

    from wbc.data.cache import split_images
    from wbc.data.layout import read_split

    root = shutil.copytree(sample_root, tmp_path / "data")
    cfg = make_cfg(root)
    df = read_split(root, "phase1").iloc[:4]
    before = np.array(split_images(cfg, df, "phase1"))
    shutil.copyfile(df["path"].iloc[1], df["path"].iloc[0])  # image 0 now holds image 1's pixels
    after = np.array(split_images(cfg, df, "phase1"))
    assert np.array_equal(after[0], before[1]) and np.array_equal(after[1:], before[1:])


def test_cache_is_rebuilt_when_the_decoder_changes(sample_root, make_cfg, monkeypatch):
    """Images decoded by older code (another resize, say) are rebuilt, not served from the cache."""
    import wbc.data.cache as cache
    from wbc.data.layout import read_split

    cfg = make_cfg(sample_root)
    df = read_split(sample_root, "phase1").iloc[:3]
    before = np.array(cache.split_images(cfg, df, "phase1"))
    monkeypatch.setattr(cache, "resize", lambda img, size: np.zeros((size, size, 3), np.uint8))
    assert np.array_equal(cache.split_images(cfg, df, "phase1"), before)  # same code: served from the cache
    monkeypatch.setattr(cache, "CODE_HASH", "changed")
    assert not np.array(cache.split_images(cfg, df, "phase1")).any()


def test_center_crop_zooms_the_cached_images_under_their_own_cache(sample_root, make_cfg):
    """`data.center_crop` keeps the central square of each image before resizing, in a cache of its own, so a
    zoomed run never reads the full-frame images (or the other way round)."""
    import cv2

    from wbc.data.cache import cache_dir, center_crop, read_image, split_images
    from wbc.data.layout import read_split

    img = np.arange(10 * 8 * 3, dtype=np.uint8).reshape(10, 8, 3)
    assert np.array_equal(center_crop(img, 0.5), img[3:7, 2:6]) and center_crop(img, 1.0) is img
    df = read_split(sample_root, "phase1").iloc[:3]
    full_cfg, zoom_cfg = make_cfg(sample_root, "data.image_size=32"), make_cfg(sample_root, "data.image_size=32",
                                                                               "data.center_crop=0.5")
    assert cache_dir(zoom_cfg) != cache_dir(full_cfg) and cache_dir(zoom_cfg).name.endswith("_32_crop0.5")
    full, zoom = np.array(split_images(full_cfg, df, "phase1")), np.array(split_images(zoom_cfg, df, "phase1"))
    src = read_image(df["path"].iloc[0])  # 64 px: the central 32 px, not resized at all
    assert np.array_equal(zoom[0], src[16:48, 16:48])
    assert np.array_equal(full[0], cv2.resize(src, (32, 32), interpolation=cv2.INTER_AREA))
    with pytest.raises(WBCError, match="center_crop"):
        cache_dir(make_cfg(sample_root, "data.center_crop=1.5"))


def test_resume_inside_stage2_is_exact(cfg2):
    """A run killed during stage 2 resumes in stage 2, with the head's optimizer and schedule, not stage 1's."""
    _, _, res = _full_and_resumed(cfg2, ["train.epochs=1", "train.stage2.epochs=2", "train.ema=false"], kill_at=1)
    assert [h["stage"] for h in res["history"]] == [1, 2, 2]


def test_augmentation_draw_depends_on_seed_epoch_and_index():
    """Seeded per (seed, epoch, index): identical images at two indices get their own draws, the run seed moves
    every draw, and a tagged epoch wins over the dataset's own epoch (workers serving a whole stage)."""
    import albumentations as A

    from wbc.data.dataset import CellDataset

    img = np.random.default_rng(1).integers(0, 255, (1, 16, 16, 3), dtype=np.uint8)
    imgs = np.repeat(img, 6, axis=0)  # the same image six times: only the seed can tell them apart
    aug = lambda: A.Compose([A.GaussNoise(std_range=(0.2, 0.4), p=1)])  # noqa: E731
    ds = CellDataset(imgs, None, aug(), seed=0)
    xs = [ds[(2, i)][0] for i in range(6)]
    assert all(not torch.equal(xs[0], x) for x in xs[1:])
    other = CellDataset(imgs, None, aug(), seed=1)
    assert not torch.equal(other[(2, 0)][0], xs[0])
    ds.set_epoch(7)
    assert torch.equal(ds[(2, 3)][0], xs[3]) and not torch.equal(ds[3][0], xs[3])


def test_a_pool_image_without_a_fold_is_refused(cfg2):
    cfg = cfg2()
    folds = pd.read_csv(cfg["folds"]["file"], dtype=str)
    write_csv(cfg["folds"]["file"], folds.iloc[1:])
    with pytest.raises(WBCError, match=rf"ID {folds['ID'].iloc[0]} has no fold \(re-run `make folds`\)"):
        load_fold_data(cfg)


def test_an_unknown_label_in_the_holdout_split_is_refused(data_copy, make_cfg):
    # With the class list from the config, an eval label outside it is an error, not a silently unscored image.
    classes = sorted(pd.read_csv(data_copy / "phase1_label.csv", dtype=str)["labels"].unique())
    cfg = make_cfg(data_copy, "folds.n_folds=2", f"data.classes=[{','.join(classes)}]")
    write_csv(cfg["folds"]["file"], build_folds(cfg))
    ev = pd.read_csv(data_copy / "phase2_eval.csv", dtype=str, keep_default_na=False)
    ev.loc[0, "labels"] = "XYZ"
    ev.to_csv(data_copy / "phase2_eval.csv", index=False)
    with pytest.raises(WBCError, match=r"phase2_eval.csv:2: unknown label 'XYZ'"):
        load_fold_data(cfg)


def test_eval_in_the_training_pool_is_not_also_a_holdout(cfg2):
    """`data.train_splits` decides the pool: with phase2_eval in it, its images are trained on and get folds, so
    they are no hold-out to predict (their scores would be on training images)."""
    cfg = cfg2("data.train_splits=[phase1,phase2_train,phase2_eval]")
    data = load_fold_data(cfg, with_test=False)
    assert "phase2_eval" in set(data.pool["split"])
    assert len(data.holdout) == 0 and data.holdout_images is None


def test_training_step_reports_the_gradient_norm_before_clipping():
    """The logged gradient norm is the true one: the autograd gradients' total norm, before any clipping."""
    from wbc.train.loop import _train_step
    from wbc.train.losses import build_loss

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (4, 3, 4, 4), dtype=np.uint8))
    y = torch.tensor([0, 1, 2, 0])
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))

    ref = model()
    xf = (x.float() / 255 - 0.5) / 0.25
    torch.nn.functional.cross_entropy(ref(xf), y).backward()
    expected = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item()
    for clip in (None, expected / 10):
        m = model()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        _, gnorm = _train_step(m, m, None, x, y, opt, sched, torch.amp.GradScaler("cuda", enabled=False),
                               build_loss({"type": "ce"}, [1, 1, 1]), torch.device("cpu"), norm,
                               {"grad_clip": clip, "amp": "none"}, 1)
        assert gnorm.item() == pytest.approx(expected, rel=1e-5)


def test_epoch_metrics_log_gradient_norms(cfg2):
    cfg = cfg2("train.epochs=2", "train.grad_clip=0.01")
    hist = train_fold(cfg, 0)["history"]
    for h in hist:
        # clipped at 0.01, yet the log shows the larger norm the step really had
        assert h["nonfinite_steps"] == 0 and 0.01 < h["grad_norm"] <= h["grad_norm_max"] < 1e3


def test_a_diverging_run_stops_with_one_line_and_keeps_the_epochs_before(cfg2, monkeypatch):
    """A NaN in epoch 1 (here planted in one step's loss) stops the run at that epoch's end with one line naming
    the run and epoch; epoch 0's metrics and checkpoints stay, nothing of epoch 1 is written."""
    from wbc.errors import TrainingDiverged
    from wbc.train import loop

    cfg = cfg2("train.epochs=3", "train.ema=false")
    real, calls = loop._batch_loss, [0]
    steps_per_epoch = []

    def poisoned(*a, **k):
        calls[0] += 1
        loss = real(*a, **k)
        return loss * float("nan") if steps_per_epoch and calls[0] == steps_per_epoch[0] + 2 else loss

    monkeypatch.setattr(loop, "_batch_loss", poisoned)
    with pytest.raises(TrainingDiverged) as e:
        train_fold(cfg, 0, on_epoch=lambda epoch, rec: steps_per_epoch.append(calls[0]))
    msg, n = str(e.value), steps_per_epoch[0]
    # the poisoned step and every later one: its NaN gradients made the weights NaN
    assert "\n" not in msg and f"fold0: epoch 1: training diverged (loss nan, {n - 1} steps with non-finite" in msg
    fold = run_dir(cfg) / "fold0"
    assert [json.loads(x)["epoch"] for x in (fold / "metrics.jsonl").read_text().splitlines()] == [0]
    assert torch_load(fold / "state.pt")["epoch"] == 0 and (fold / "best.pt").exists()


def test_a_real_blow_up_is_caught(cfg2):
    """No planted NaN: an absurd learning rate overflows the weights within the first epoch."""
    from wbc.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="epoch 0: training diverged"):
        train_fold(cfg2("train.epochs=2", "train.lr=1e30", "train.warmup_epochs=0"), 0)


def test_a_collapsing_run_is_warned_about_in_the_log_and_the_console(cfg2, monkeypatch, capsys):
    """A finite loss back above the first epoch's is flagged in that epoch's metrics and on the console; a loss
    that merely rises, and stage 2's new head, are not."""
    from wbc.train import loop

    losses = iter([2.0, 1.5, 1.8, 2.1, 3.0])  # the last: stage 2, a fresh head
    real = loop._train_epoch

    def scripted(*a, **k):
        return {**real(*a, **k), "loss": next(losses)}

    monkeypatch.setattr(loop, "_train_epoch", scripted)
    cfg = cfg2("train.epochs=4", "train.stage2.epochs=1", "train.ema=false")
    capsys.readouterr()
    train_fold(cfg, 0)
    recs = [json.loads(x) for x in (run_dir(cfg) / "fold0" / "metrics.jsonl").read_text().splitlines()]
    assert [bool(r.get("warning")) for r in recs] == [False, False, False, True, False]
    assert "epoch 3: training loss 2.1 is back above its first epoch's 2; the run is collapsing" in recs[3]["warning"]
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "lower train.grad_clip" in out.replace("\n", " ")


def test_a_deadline_stops_training_at_an_epoch_end_and_a_resume_finishes_it(cfg2, monkeypatch):
    """`--deadline` (make's TIME_LIMIT): at the first epoch's end from which the fold would not finish in time the
    state is saved and DeadlineReached raised; RESUME then ends where an uninterrupted run ends."""
    import wbc.train.deadline as dl

    over = ["train.epochs=4", "train.num_workers=0"]
    full = cfg2(*over, "name=full")
    data = load_fold_data(full)
    train_fold(full, 0, data=data)

    now = [0.0]
    monkeypatch.setattr(dl, "clock", lambda: now[0])
    part = cfg2(*over, "name=part")
    with pytest.raises(dl.DeadlineReached, match="stopped after epoch 1, state saved"):
        # 1 s left, but never less than the two remaining epochs need: the first epoch alone does not decide
        train_fold(part, 0, data=data, deadline=dl.Deadline(at=1e-9))
    out = run_dir(part) / "fold0"
    assert torch_load(out / "state.pt")["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 and not (out / "train_result.json").exists()

    late = cfg2(*over, "name=late")
    with pytest.raises(dl.DeadlineReached, match="stopped after epoch 0"):
        train_fold(late, 0, data=data, deadline=dl.Deadline(at=-1.0))  # already passed: the first epoch decides

    plenty = cfg2(*over, "name=plenty")
    assert len(train_fold(plenty, 0, data=data, deadline=dl.Deadline(at=1e6))["history"]) == 4

    train_fold(part, 0, resume=True, data=data)
    a, b = (torch_load(run_dir(c) / "fold0" / "last.pt") for c in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_deadline_rule_on_given_epoch_times(monkeypatch):
    import wbc.train.deadline as dl

    monkeypatch.setattr(dl, "clock", lambda: 0.0)
    fold, epoch = dl.Deadline(at=100.0), dl.Deadline(at=100.0, mode="epoch")
    # 100 s left; epochs of 10 s after a 50 s first one (start-up), 20 to go, predictions 1e4 views at 1 ms
    assert fold.must_stop([50.0, 10.0, 10.0], 20, 1e-3, 10_000) == pytest.approx(210.0)
    assert fold.must_stop([50.0, 10.0, 10.0], 9, 1e-3, 10_000) is None  # 90 + 10 s fits
    assert epoch.must_stop([50.0, 10.0, 10.0], 20, 1e-3, 10_000) is None  # the next epoch fits
    assert dl.Deadline(at=5.0, mode="epoch").must_stop([50.0, 10.0], 20, 0, 0) == pytest.approx(10.0)
    assert fold.must_stop([500.0], 20, 0, 0) is None  # the first epoch alone does not decide ...
    assert dl.Deadline(at=0.0).must_stop([500.0], 20, 0, 0) == pytest.approx(10_000.0)  # ... unless time is up
    assert fold.must_stop([10.0, 10.0], 0, 1.0, 10_000) is None  # nothing left to stop
    assert dl.Deadline().must_stop([10.0, 10.0], 1000, 0, 0) is None
    epoch.check_fold(3, 1000.0)  # mode epoch starts every fold: a resume on the same disk goes on with it
    with pytest.raises(dl.DeadlineReached):
        fold.check_fold(3, 1000.0)
    with pytest.raises(ValueError, match="deadline mode"):
        dl.Deadline(at=1.0, mode="soon")


def test_a_fold_that_would_not_fit_before_the_deadline_is_not_started(cfg2, capsys):
    import time

    from wbc.__main__ import main
    from wbc.train.deadline import EXIT_CODE, Deadline, DeadlineReached

    d = Deadline(at=time.time() + 100)
    d.check_fold(1, None)  # the first fold of a process has no estimate: the epoch-end check covers it
    d.check_fold(1, 50.0)
    with pytest.raises(DeadlineReached, match="fold 1 not started: the last fold took 200 s"):
        d.check_fold(1, 200.0)

    cfg = cfg2("train.epochs=1", "predict.tta=1")
    args = ["train-fold", "-c", "configs/tiny_cpu.yaml", "--fold", "0,1", "--time-limit", "0",
            f"data.root={cfg['data']['root']}", f"output_dir={cfg['output_dir']}",
            f"data.cache_dir={cfg['data']['cache_dir']}", f"folds.file={cfg['folds']['file']}", "folds.n_folds=2",
            "train.epochs=1", "predict.tta=1"]
    capsys.readouterr()
    assert main(args) == EXIT_CODE  # one epoch: fold 0 has nothing to stop early, fold 1 is refused (time is up)
    assert "deadline: fold 1 not started" in capsys.readouterr().out
    assert (run_dir(cfg) / "fold0" / "oof.csv").exists() and not (run_dir(cfg) / "fold1").exists()


def test_train_bundle_interrupts_a_training_that_overruns_and_still_bundles(sample_root, make_cfg, tmp_path,
                                                                             monkeypatch):
    """The backstop: a training still running `kill_after_s` past the deadline (stuck in one long epoch, say) is
    interrupted, and the runs are bundled all the same, checkpoints left out."""
    import tarfile
    import time

    import wbc.train.cli as train_cli
    from wbc.train.deadline import Deadline, DeadlineReached

    cfg = make_cfg(sample_root)
    overrides = [f"data.root={sample_root}", f"output_dir={cfg['output_dir']}"]

    def stuck(cfg, folds, resume, deadline):
        out = run_dir(cfg) / "fold0"
        out.mkdir(parents=True)
        (run_dir(cfg) / "config.yaml").write_text("name: x\n")  # as training writes it first
        (out / "metrics.jsonl").write_text("{}\n")
        (out / "state.pt").write_text("x")
        time.sleep(60)

    monkeypatch.setattr(train_cli, "train_folds", stuck)
    t0 = time.monotonic()
    with pytest.raises(DeadlineReached, match="interrupted"):
        train_cli.train_bundle(["configs/tiny_cpu.yaml"], overrides, [0], False, Deadline(time.time()),
                               tmp_path / "b", kill_after_s=1)
    assert time.monotonic() - t0 < 10
    with tarfile.open(tmp_path / "b" / "tiny_cpu.tar.gz") as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
    assert names == {"tiny_cpu/config.yaml", "tiny_cpu/fold0/metrics.jsonl"}


def test_excluded_images_never_train_but_are_still_predicted(cfg2, tmp_path):
    """`data.exclude_from_training` (e.g. `make label-issues`' list): the listed pool images leave every fold's
    training set, and keep their out-of-fold predictions."""
    import json

    cfg = cfg2("train.epochs=1", "predict.tta=1")
    pool = load_fold_data(cfg).pool
    drop = pd.concat([pool[pool["fold"] == 0].head(3), pool[pool["fold"] == 1].head(5)])
    write_csv(tmp_path / "issues.csv", drop[["ID", "labels"]])
    cfg = cfg2("train.epochs=1", "predict.tta=1", f"data.exclude_from_training={tmp_path / 'issues.csv'}")
    data = load_fold_data(cfg)
    train_fold(cfg, 0, data=data)
    predict_fold(cfg, 0, data)
    result = json.loads((run_dir(cfg) / "fold0" / "train_result.json").read_text())
    assert result["n_train"] == int((pool["fold"] != 0).sum()) - 5
    oof = load_probs(run_dir(cfg) / "fold0" / "oof.csv")
    assert set(drop["ID"][:3]) <= set(oof.ids) and len(oof.ids) == int((pool["fold"] == 0).sum())

    write_csv(tmp_path / "bad.csv", pd.DataFrame({"id": ["x"]}))
    with pytest.raises(WBCError, match=r"bad.csv:1: missing column\(s\) ID"):
        load_fold_data(cfg2(f"data.exclude_from_training={tmp_path / 'bad.csv'}"))
    write_csv(tmp_path / "bad.csv", pd.DataFrame({"ID": [pool["ID"].iloc[0], "nope.jpg"]}))
    with pytest.raises(WBCError, match=r"bad.csv:3: ID nope.jpg is not in the training pool"):
        load_fold_data(cfg2(f"data.exclude_from_training={tmp_path / 'bad.csv'}"))


def test_the_deadline_counts_every_prediction_the_fold_will_make(cfg2, monkeypatch):
    """A specialist predicts the whole fold, not only its classes, and BatchNorm adaptation adds a pass per split:
    both count in the time the fold still needs."""
    import time

    from wbc.train import deadline as dl

    seen = []
    real = dl.Deadline.must_stop
    monkeypatch.setattr(dl.Deadline, "must_stop", lambda self, *a: seen.append(a[3]) or real(self, *a))
    cfg = cfg2("train.epochs=1", "predict.tta=2", "predict.adapt_bn=0.5", "data.subset_classes=[LY, SNE, MY]")
    data = load_fold_data(cfg)
    train_fold(cfg, 0, data=data, deadline=dl.Deadline(at=time.time() + 3600))
    n = int((data.pool["fold"] == 0).sum()) + len(data.holdout) + len(data.test)
    fold_rows = data.pool[data.pool["fold"] == 0]
    assert seen == [3 * n] and len(fold_rows) > int(data.in_classes(fold_rows).sum())  # beyond its classes
