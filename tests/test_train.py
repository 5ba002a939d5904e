"""A real (tiny) training run on CPU: it learns, it resumes exactly, its OOF covers the pool."""
import itertools
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import write_folds
from wbc.core.errors import WBCError
from wbc.core.io import load_probs, torch_load, write_csv
from wbc.core.run_folder import FOLD_RESULTS, run_dir
from wbc.s3_train.inputs import load_fold_data
from wbc.s3_train.loop import StopTraining, train_fold
from wbc.s4_predict.fold import predict_fold
from wbc.s4_predict.merge import merge_run


@pytest.mark.slow
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


@pytest.mark.slow
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
    import wbc.s3_train.loop as loop

    cfg = cfg2("train.epochs=1")
    out = run_dir(cfg) / "fold0"
    out.mkdir(parents=True)
    for name in FOLD_RESULTS + ("unrelated.txt",):
        (out / name).write_text("an older run's")

    def killed(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_record_environment", killed)  # the first thing after the start: a kill there
    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 0)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "fold.json", "unrelated.txt"]  # the new start's
    with pytest.raises(KeyboardInterrupt):  # a resume with nothing to resume is a fresh start too
        train_fold(cfg, 0, resume=True)


@pytest.mark.slow
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

    from wbc.s7_submit.submit import submit_from_predictions

    sub = submit_from_predictions(run_dir(cfg), cfg["data"]["root"], "t", data.classes,
                                  out_dir=run_dir(cfg) / "subs")
    got = pd.read_csv(sub, dtype=str)
    want = np.asarray(test.classes)[test.probs.argmax(1)]
    assert dict(zip(got["ID"], got["labels"])) == dict(zip(test.ids, want))
    side = json.loads(sub.with_suffix(".json").read_text())
    assert side["cv_macro_f1"] == rep["oof"]["macro_f1"] and side["folds"] == [0, 1]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_skips_a_finished_fold(cfg2, capsys):
    """`RESUME=1 make train-all` after a killed call: finished folds are neither retrained nor re-predicted, but a
    fold restarted since its predictions (env.json rewritten at every start) is not taken as finished."""
    from wbc.__main__ import main

    cfg = cfg2("train.epochs=1", "predict.tta=1")
    args = ["train-fold", "-c", "configs/recipes/tiny_cpu.yaml", "--fold", "0", f"data.root={cfg['data']['root']}",
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


@pytest.mark.slow
def test_training_steps_never_wait_for_the_device(cfg2, monkeypatch):
    """A GPU stays busy only while the host queues steps ahead of it, so a step must not read a value back
    (`.item()`: the running loss stays on the device) nor copy constants host-to-device (the normalisation
    statistics and Remix's class counts are built once). Counted here on the CPU, inside the training epochs."""
    import wbc.models.inference as inference
    import wbc.s3_train.loop as loop

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
    real_epoch = loop.train_epoch

    def epoch(*a, **k):
        counts["steps"] += a[2]  # n_batches
        counts["epochs"] += 1
        inside[0] = True
        try:
            return real_epoch(*a, **k)
        finally:
            inside[0] = False

    monkeypatch.setattr(loop, "train_epoch", epoch)
    before = inference._stats.cache_info()
    res = train_fold(cfg, 0)
    after = inference._stats.cache_info()
    assert counts["epochs"] == 2 and counts["steps"] >= 8
    assert counts["item"] == 0  # the epoch's loss is read once, by float(), at its end
    assert counts["as_tensor"] <= counts["epochs"]  # one Mixer per epoch copies its class counts once
    assert after.hits + after.misses - before.hits - before.misses >= counts["steps"]
    assert after.misses - before.misses <= 1
    assert all(np.isfinite(h["train_loss"]) for h in res["history"])


@pytest.mark.slow
def test_one_loader_iterator_serves_each_stage(cfg2, monkeypatch):
    """The workers prefetch across epoch boundaries (and during validation) only if a stage keeps one iterator:
    3 + 2 epochs make two, each taking the loader's seed at its stage's first epoch."""
    import wbc.s3_train.loop as loop
    from wbc.s1_data.dataset import EpochTagged, StageBatches

    made = []
    real = loop.stage_iterator
    monkeypatch.setattr(loop, "stage_iterator",
                        lambda loader, draw_seed: made.append(draw_seed) or real(loader, draw_seed))
    res = train_fold(cfg2("train.epochs=3", "train.stage2.epochs=2", "train.num_workers=1"), 0)
    assert made == [True, True] and [h["stage"] for h in res["history"]] == [1, 1, 1, 2, 2]

    tagged = EpochTagged(10, seed=3)
    stream = list(StageBatches(tagged, 4, first=2, end=4))
    assert len(stream) == len(StageBatches(tagged, 4, 2, 4)) == 4  # two full batches of 4 per 10-image epoch
    for epoch, batches in ((2, stream[:2]), (3, stream[2:])):
        tagged.set_epoch(epoch)
        assert sum(batches, []) == list(tagged)[:8]  # that epoch's own draw, its partial batch dropped


@pytest.mark.slow
def test_several_folds_in_one_process_match_separate_runs(cfg2, capsys):
    """`make train-all` trains its folds in one process (`--fold 0,1`): each fold is seeded afresh, so fold 1
    after fold 0 is the fold 1 of a run of its own."""
    from wbc.__main__ import main

    cfg = cfg2("train.epochs=2", "model.drop_path_rate=0.2", "train.num_workers=1", "predict.tta=1")
    base = ["-c", "configs/recipes/tiny_cpu.yaml", f"data.root={cfg['data']['root']}",
            f"output_dir={cfg['output_dir']}",
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
    with pytest.raises(SystemExit) as e:  # argparse's usage error, one line
        main(["train-fold", "--fold", "0,x", *base])
    assert e.value.code == 2 and "integers separated by commas" in capsys.readouterr().out


@pytest.mark.slow
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
    from wbc.s3_train.loader import check_shared_memory

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

    import wbc.models.inference as inference
    from wbc.core import hooks
    from wbc.core.config import CONFIG_DIR, load_config
    from wbc.s3_train.optim import stage_loss
    from wbc.s3_train.step import StepContext, batch_loss

    base = load_config(CONFIG_DIR / "base.yaml", [])
    t, augment = base["train"], base["augment"]
    t = {**t, **{k: ({**t[k], **v} if isinstance(v, dict) else v) for k, v in recipe.items()}, "epochs": 3,
         "amp": "none"}
    counts, device = np.array([50, 20, 5, 1]), torch.device("cuda")
    inference._stats.cache_clear()  # fake constants must not outlive the fake mode
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            with device:  # made there: converting a module's parameters to fake tensors is not supported
                model = timm.create_model("test_resnet", num_classes=4)
            loss_fn = stage_loss(t, counts, stage, device)
            views = int(t["consistency"]["views"]) if t["consistency"]["weight"] > 0 else 0
            x = torch.randint(0, 255, (8, *([views] if views else []), 3, 32, 32), dtype=torch.uint8)  # as loaded
            y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
            hook = hooks.single("train_batch", {"train": t})
            rule = hook.build({"train": t, "augment": augment}, counts, 0).rule(0) if hook and stage == 1 else None
            norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
            ctx = StepContext(model, model, None, None, None, None, loss_fn, device, norm, "none", True, 0.0, stage,
                              rule)
            loss = batch_loss(ctx, x, y)
            assert loss.device == torch.device("cuda", 0) and loss.shape == ()
    finally:
        inference._stats.cache_clear()


def test_warmup_then_cosine_to_min_lr():
    from wbc.s3_train.optim import warmup_cosine

    f = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warm-up
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # held at the floor


def test_gradient_clipping_bounds_the_step():
    from wbc.s3_train.losses import build_loss
    from wbc.s3_train.step import StepContext, train_step

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
        ce = build_loss({"type": "ce", "label_smoothing": 0.0}, [1, 1, 1])
        train_step(StepContext(model, model, None, opt, sched, scaler, ce, torch.device("cpu"), norm, "none", False,
                               clip, 1), x, y)
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()

    assert step(0.5) == pytest.approx(0.5, rel=1e-4)  # SGD with lr 1 moves by the clipped gradient norm
    assert step(None) > 10


@pytest.mark.slow
def test_best_checkpoint_follows_val_macro_f1_and_survives_a_resume(cfg2, monkeypatch):
    """best.pt holds the weights of the best validation macro-F1 (scripted here), also across a kill and resume:
    the resumed run must remember the best score, or a worse epoch would overwrite best.pt."""
    import wbc.s3_train.loop as loop

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


@pytest.mark.slow
def test_stage2_retrains_the_head_on_the_frozen_backbone_with_balanced_sampling(cfg2, monkeypatch):
    import wbc.s3_train.optim as optim
    from wbc.s3_train.optim import stage_loss

    kinds = []
    real = optim.build_sampler
    monkeypatch.setattr(optim, "build_sampler", lambda y, n, c, **k: kinds.append(c["type"]) or real(y, n, c, **k))
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


@pytest.mark.slow
def test_resume_inside_stage2_is_exact(cfg2):
    """A run killed during stage 2 resumes in stage 2, with the head's optimizer and schedule, not stage 1's."""
    _, _, res = _full_and_resumed(cfg2, ["train.epochs=1", "train.stage2.epochs=2", "train.ema=false"], kill_at=1)
    assert [h["stage"] for h in res["history"]] == [1, 2, 2]


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
    write_folds(cfg)
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
    from wbc.s3_train.losses import build_loss
    from wbc.s3_train.step import StepContext, train_step

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
        ctx = StepContext(m, m, None, opt, sched, torch.amp.GradScaler("cuda", enabled=False),
                          build_loss({"type": "ce", "label_smoothing": 0.0}, [1, 1, 1]), torch.device("cpu"), norm,
                          "none", False, clip, 1)
        _, gnorm = train_step(ctx, x, y)
        assert gnorm.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_epoch_metrics_log_gradient_norms(cfg2):
    cfg = cfg2("train.epochs=2", "train.grad_clip=0.01")
    hist = train_fold(cfg, 0)["history"]
    for h in hist:
        # clipped at 0.01, yet the log shows the larger norm the step really had
        assert h["nonfinite_steps"] == 0 and 0.01 < h["grad_norm"] <= h["grad_norm_max"] < 1e3


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line_and_keeps_the_epochs_before(cfg2, monkeypatch):
    """A NaN in epoch 1 (here planted in one step's loss) stops the run at that epoch's end with one line naming
    the run and epoch; epoch 0's metrics and checkpoints stay, nothing of epoch 1 is written."""
    from wbc.core.errors import TrainingDiverged
    from wbc.s3_train import step

    cfg = cfg2("train.epochs=3", "train.ema=false")
    real, calls = step.batch_loss, [0]
    steps_per_epoch = []

    def poisoned(*a, **k):
        calls[0] += 1
        loss = real(*a, **k)
        return loss * float("nan") if steps_per_epoch and calls[0] == steps_per_epoch[0] + 2 else loss

    monkeypatch.setattr(step, "batch_loss", poisoned)
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
    from wbc.core.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="epoch 0: training diverged"):
        train_fold(cfg2("train.epochs=2", "train.lr=1e30", "train.warmup_epochs=0"), 0)


@pytest.mark.slow
def test_a_collapsing_run_is_warned_about_in_the_log_and_the_console(cfg2, monkeypatch, capsys):
    """A finite loss back above the first epoch's is flagged in that epoch's metrics and on the console; a loss
    that merely rises, and stage 2's new head, are not."""
    from wbc.s3_train import loop

    losses = iter([2.0, 1.5, 1.8, 2.1, 3.0])  # the last: stage 2, a fresh head
    real = loop.train_epoch

    def scripted(*a, **k):
        return {**real(*a, **k), "loss": next(losses)}

    monkeypatch.setattr(loop, "train_epoch", scripted)
    cfg = cfg2("train.epochs=4", "train.stage2.epochs=1", "train.ema=false")
    capsys.readouterr()
    train_fold(cfg, 0)
    recs = [json.loads(x) for x in (run_dir(cfg) / "fold0" / "metrics.jsonl").read_text().splitlines()]
    assert [bool(r.get("warning")) for r in recs] == [False, False, False, True, False]
    assert "epoch 3: training loss 2.1 is back above its first epoch's 2; the run is collapsing" in recs[3]["warning"]
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "lower train.grad_clip" in out.replace("\n", " ")


@pytest.mark.slow
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




@pytest.mark.slow
def test_a_low_resolution_phase_trains_on_its_own_cache_and_resumes_exactly(cfg2, monkeypatch):
    """`train.low_res`: the epochs before the last `final_epochs` train and validate at the low size (their own
    cache), the rest at data.image_size; a run killed at the switch resumes to the uninterrupted run's losses."""
    import wbc.s3_train.loop as loop
    from wbc.s1_data.cache import cache_dir

    over = ["data.image_size=64", "train.epochs=4", "train.low_res.size=32", "train.low_res.final_epochs=2",
            "train.num_workers=1"]
    sizes = []
    real = loop.train_epoch

    def spy(ctx, batches, n, desc):
        first = next(batches)
        sizes.append(first[0].shape[-1])
        return real(ctx, itertools.chain([first], batches), n, desc)

    full_cfg = cfg2(*over, "name=full")
    monkeypatch.setattr(loop, "train_epoch", spy)
    full = [h["train_loss"] for h in train_fold(full_cfg, 0)["history"]]
    monkeypatch.setattr(loop, "train_epoch", real)
    assert sizes == [32, 32, 64, 64]
    assert (cache_dir(full_cfg).parent / cache_dir(full_cfg).name.replace("_64", "_32")).is_dir()
    part = cfg2(*over, "name=part")

    def kill(epoch, rec):
        if epoch == 1:
            raise StopTraining

    with pytest.raises(StopTraining):
        train_fold(part, 0, on_epoch=kill)
    assert [h["train_loss"] for h in train_fold(part, 0, resume=True)["history"]] == full
    plain = [h["train_loss"] for h in train_fold(cfg2("data.image_size=64", "train.epochs=4", "train.num_workers=1",
                                                      "name=plain"), 0)["history"]]
    assert plain[2:] != full[2:]
    with pytest.raises(WBCError, match="train.low_res: size 64 must be in"):
        train_fold(cfg2(*over, "train.low_res.size=64", "name=bad"), 0)


def test_two_epochs_of_one_predicted_class_are_a_collapse():
    """Validation predicting a single class two stage-1 epochs running is flagged even while the loss falls (a
    GroupNorm Lite0 sat there for 16 epochs unflagged); one such epoch, or two in stage 2, are not."""
    from wbc.s3_train.guards import collapse_warning

    def rec(loss, k, stage=1):
        return {"stage": stage, "train_loss": loss, "val_classes_predicted": k}

    assert collapse_warning([rec(2.7, 1), rec(2.2, 1)], "f0: epoch 1") == (
        "f0: epoch 1: every validation image was predicted as one class in the last two epochs; the run has "
        "collapsed: lower train.lr, lengthen train.warmup_epochs or set train.grad_clip")
    assert collapse_warning([rec(2.7, 1), rec(2.2, 4)], "f0") is None
    assert collapse_warning([rec(2.7, 3), rec(2.2, 1)], "f0") is None
    assert collapse_warning([rec(2.7, 5), rec(2.2, 1), rec(2.0, 1, stage=2), rec(1.9, 1, stage=2)], "f0") is None
    assert collapse_warning([{"stage": 1, "train_loss": 2.0}, {"stage": 1, "train_loss": 1.0}], "f0") is None
