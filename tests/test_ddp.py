"""`make train-fold NPROC=2`: one model over two processes (torchrun + DistributedDataParallel; gloo on this CPU).

The equivalence run uses ConvNeXt's test model, which normalises with LayerNorm: its forward treats every image on its
own, so a step on two half batches whose gradients DDP averages is the single process's step on the whole batch, up to
float summation order. A BatchNorm network would not match: each process normalises its half with that half's
statistics (SyncBatchNorm, `train.sync_bn`, which would make them global, runs on CUDA only). Everything else a fold
does is on: the class-weighted sampler, damage augmentation, EMA, gradient clipping, the warm-up schedule, the
TensorBoard tracker, predictions of every split."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from helpers import ROOT, make, write_folds

TINY = ["folds.n_folds=2", "data.image_size=32", "model.arch=test_convnext", "train.epochs=3", "train.ema=true",
        "predict.tta=1"]


def path_overrides(cfg: dict) -> list[str]:
    return [f"data.root={cfg['data']['root']}", f"output_dir={cfg['output_dir']}",
            f"data.cache_dir={cfg['data']['cache_dir']}", f"folds.file={cfg['folds']['file']}"]


def torchrun(nproc: int, audit_dir, watch, *args) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (its rendezvous on port 0: a free port for each run) of tests/ddp_audit.py, which runs
    `wbc <args>` and logs each rank's file writes under `watch`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "ddp_audit.py"), str(audit_dir), str(watch), *args]
    env = {**{k: v for k, v in os.environ.items() if k not in ("RESUME", "WORLD_SIZE", "RANK", "LOCAL_RANK")},
           "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def files(folder) -> list[str]:
    """Files under `folder`, relative, TensorBoard event files by folder (their names hold a pid and a time)."""
    return sorted(str(p.relative_to(folder).parent / "events") if p.name.startswith("events.out") else
                  str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_two_processes_train_like_one_at_the_same_global_batch_and_only_rank_0_writes(sample_root, make_cfg,
                                                                                      tmp_path):
    from wbc.ops.deadline import Deadline
    from wbc.ops.fold_runner import train_folds

    cfg = write_folds(make_cfg(sample_root, *TINY, "name=ddp"))  # the folds exist; the image caches do not yet
    r = torchrun(2, tmp_path / "audit", tmp_path, "train-fold", "-c", "configs/recipes/tiny_cpu.yaml", "--fold", "0",
                 *path_overrides(cfg), *TINY, "name=ddp")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train_folds(make_cfg(sample_root, *TINY, "name=single"), [0], resume=False, deadline=Deadline())
    ddp, single = (tmp_path / "outputs" / n / "fold0" for n in ("ddp", "single"))

    # the same per-epoch losses: float summation order apart (measured: 4e-8 relative)
    a, b = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (ddp, single))
    assert len(a) == len(b) == 3
    for key in ("train_loss", "val_loss", "grad_norm", "lr"):
        np.testing.assert_allclose([e[key] for e in a], [e[key] for e in b], rtol=1e-5, err_msg=key)

    # OOF: every fold-0 pool image once, in ID order, the probabilities of the single process's model
    oof, ref = (pd.read_csv(d / "oof.csv", dtype={"ID": str}) for d in (ddp, single))
    folds = pd.read_csv(cfg["folds"]["file"], dtype=str)
    assert oof["ID"].tolist() == folds.loc[folds["fold"] == "0", "ID"].tolist() == sorted(oof["ID"])
    assert oof["ID"].is_unique and oof["ID"].tolist() == ref["ID"].tolist()
    for name in ("oof.csv", "eval.csv", "test.csv"):
        p, q = (pd.read_csv(d / name, dtype={"ID": str}) for d in (ddp, single))
        assert p["ID"].tolist() == q["ID"].tolist(), name
        np.testing.assert_allclose(p.filter(like="prob_").to_numpy(), q.filter(like="prob_").to_numpy(), atol=1e-4)

    # only rank 0 wrote: the same files as one process, and rank 1 wrote, renamed or removed nothing
    assert files(ddp.parent) == files(single.parent)
    written = {r: json.loads((tmp_path / "audit" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert written[1] == []
    assert {str(ddp / "oof.csv"), str(ddp / "best.pt"), str(ddp / "metrics.jsonl")} <= set(written[0])
    assert any("/cache/" in p for p in written[0]) and any("/tensorboard/" in p for p in written[0])


def test_rank_shares_split_each_global_batch_without_padding():
    """Each rank draws the same global epoch (a class-weighted sampler seeded by (seed, epoch)) and keeps every
    world-th index of each batch: disjoint shares that make up the batch, whatever the world size."""
    from wbc.s1_data.dataset import EpochTagged, StageBatches
    from wbc.s3_train.distributed import RankShare
    from wbc.s3_train.sampling import build_sampler

    y = np.repeat(np.arange(4), [40, 10, 5, 1])
    batches = lambda: StageBatches(EpochTagged(len(y), build_sampler(y, 4, {"type": "sqrt"}, seed=3), 3), 12, 0, 2)  # noqa: E731
    whole = list(batches())
    for world in (2, 3, 4):
        shares = [list(RankShare(batches(), r, world)) for r in range(world)]
        assert all(len(s) == len(whole) for s in shares)
        for k, batch in enumerate(whole):
            parts = [s[k] for s in shares]
            assert sorted(i for p in parts for i in p) == sorted(batch) and {len(p) for p in parts} == {12 // world}


def test_helpers_change_nothing_in_a_single_process():
    import torch

    from wbc.s3_train import distributed

    model, images = torch.nn.Linear(2, 2), np.zeros((5, 4, 4, 3), np.uint8)
    assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.wrap(model, torch.device("cpu")) is model
    assert distributed.sync_batchnorm(model, True) is model
    batches = [[1, 2, 3]]
    assert distributed.share(batches, 3) is batches
    assert distributed.predict_rows(lambda rows: rows, images) is images
    ep = {"loss": 1.5, "n": 3}
    assert distributed.epoch_totals(ep, torch.device("cpu")) is ep


def test_what_processes_cannot_share_is_refused_in_one_line(cfg2, monkeypatch):
    import torch

    from wbc.core.errors import WBCError
    from wbc.ops.deadline import Deadline
    from wbc.ops.fold_runner import run_folds
    from wbc.s3_train.distributed import check

    cpu = torch.device("cpu")
    with pytest.raises(WBCError, match=r"train.batch_size 32 \(the global batch\) does not divide among 3 processes"):
        check(cfg2(), 3, cpu)
    with pytest.raises(WBCError, match="train.sync_bn needs CUDA"):
        check(cfg2("train.sync_bn=true"), 2, cpu)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(WBCError, match="GPUS= .* and NPROC= .* do not mix"):
        run_folds(cfg2(), None, [], [0], False, Deadline(), ["0", "1"])


def test_make_nproc_launches_torchrun():
    for target, fold in (("train-fold", "--fold 0"), ("train-all", "--fold 0,1,2,3,4")):
        r = make("-n", target, "NPROC=2")
        assert r.returncode == 0, r.stderr
        assert f"torchrun --standalone --nproc_per_node=2 -m wbc {target.replace('train-all', 'train-fold')} " \
               f"-c \"configs/recipes/tiny_cpu.yaml\" {fold}" in r.stdout, r.stdout
        assert "torchrun" not in make("-n", target).stdout
