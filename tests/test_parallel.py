"""`make train-all GPUS=...`: folds side by side, a `wbc train-fold` process per GPU slot (train/parallel.py).
On this CPU a slot's CUDA_VISIBLE_DEVICES changes nothing, so the folds must match an in-process run exactly."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import write_folds

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=32", "train.epochs=1", "predict.tta=1"]


@pytest.fixture
def folds3(sample_root, make_cfg):

    cfg = make_cfg(sample_root, "folds.n_folds=3", *TINY)
    write_folds(cfg)
    return cfg


def wbc(cfg, *args, wait=True):
    overrides = [f"data.root={cfg['data']['root']}", f"output_dir={cfg['output_dir']}",
                 f"data.cache_dir={cfg['data']['cache_dir']}", f"folds.file={cfg['folds']['file']}",
                 "folds.n_folds=3", *TINY]
    cmd = [sys.executable, "-m", "wbc", "train-fold", "-c", "configs/recipes/tiny_cpu.yaml", *args, *overrides]
    env = {**{k: v for k, v in os.environ.items() if k != "RESUME"}, "PYTHONPATH": str(ROOT / "src")}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_folds_on_gpu_slots_match_an_in_process_run_and_resume_skips_them(folds3, make_cfg, sample_root):
    from wbc.core.run_folder import finished
    from wbc.ops.deadline import Deadline
    from wbc.ops.fold_runner import train_folds

    r = wbc(folds3, "--fold", "0,1,2", "--gpus", "a,b")
    assert r.returncode == 0, r.stdout + r.stderr
    run = Path(folds3["output_dir"]) / "sample_tiny_cpu"
    summary = json.loads((run / "parallel_train.json").read_text())
    assert [(s["fold"], s["status"], s["exit"]) for s in summary] == [(0, "done", 0), (1, "done", 0), (2, "done", 0)]
    assert [s["gpu"] for s in summary[:2]] == ["a", "b"] and summary[2]["gpu"] in ("a", "b")  # fold 2 waited
    for s in summary:  # each fold's process saw its own slot, and logged its training there
        log = (run / "logs" / f"fold{s['fold']}.log").read_text()
        assert f"CUDA_VISIBLE_DEVICES={s['gpu']} ===" in log and f"fold {s['fold']} epoch 0" in log
        assert finished(run / f"fold{s['fold']}")

    alone = make_cfg(sample_root, "folds.n_folds=3", "name=alone", *TINY)
    train_folds(alone, [1], resume=False, deadline=Deadline())
    parallel = pd.read_csv(run / "fold1" / "oof.csv")
    in_process = pd.read_csv(Path(alone["output_dir"]) / "alone" / "fold1" / "oof.csv")
    pd.testing.assert_frame_equal(parallel, in_process, check_exact=False, rtol=1e-6)

    logs = {k: (run / "logs" / f"fold{k}.log").stat().st_size for k in range(3)}
    r = wbc(folds3, "--fold", "0,1,2", "--gpus", "a,b", "--resume")
    assert r.returncode == 0 and r.stdout.count("nothing to resume") == 3, r.stdout
    assert logs == {k: (run / "logs" / f"fold{k}.log").stat().st_size for k in range(3)}  # no process started


@pytest.mark.slow
def test_a_failed_fold_is_named_with_its_log_and_the_others_finish(folds3):
    import torch

    r = wbc(folds3, "--fold", "0,7", "--gpus", "a,b")
    assert r.returncode == 2, r.stdout
    assert ("no CUDA GPU visible" in r.stdout) != torch.cuda.is_available()  # slots that select nothing: said
    assert "fold(s) 7 failed" in r.stdout and "--fold 7: folds.n_folds is 3" in r.stdout  # the log's tail, shown
    run = Path(folds3["output_dir"]) / "sample_tiny_cpu"
    assert [s["status"] for s in json.loads((run / "parallel_train.json").read_text())] == ["done", "failed"]


@pytest.mark.slow
def test_no_fold_starts_past_the_deadline(folds3):
    r = wbc(folds3, "--fold", "0,1", "--gpus", "a", "--time-limit", "0")
    assert r.returncode == 75, r.stdout
    run = Path(folds3["output_dir"]) / "sample_tiny_cpu"
    assert [s["status"] for s in json.loads((run / "parallel_train.json").read_text())] == ["not started"] * 2
    assert not (run / "fold0").exists()


@pytest.mark.slow
def test_a_terminated_parent_stops_its_folds(folds3):
    p = wbc(folds3, "--fold", "0,1", "--gpus", "a,b", "train.epochs=50", wait=False)
    run = Path(folds3["output_dir"]) / "sample_tiny_cpu"
    logs = [run / "logs" / f"fold{k}.log" for k in (0, 1)]
    t0 = time.monotonic()
    while not all(f.exists() and "class-prior correction" in f.read_text() for f in logs):  # both about to train
        assert p.poll() is None and time.monotonic() - t0 < 900, p.stdout.read() if p.poll() is not None else ""
        time.sleep(0.2)
    # to the parent alone (`kill`, `timeout`, a notebook's stop; Ctrl-C reaches every process of the terminal's
    # group anyway, and the parent handles it the same way): it must pass the stop on
    p.send_signal(signal.SIGTERM)
    p.wait(60)
    for k in (0, 1):
        assert "KeyboardInterrupt" in (run / "logs" / f"fold{k}.log").read_text()
        assert not (run / f"fold{k}" / "train_result.json").exists()  # stopped, not finished
    assert [s["status"] for s in json.loads((run / "parallel_train.json").read_text())] == ["interrupted"] * 2


@pytest.mark.slow
def test_a_predict_only_config_is_refused_before_any_fold_starts(folds3):
    for gpus in ([], ["--gpus", "a"]):
        r = wbc(folds3, "--fold", "0", *gpus, "predict.checkpoints=outputs/other")
        assert r.returncode == 2 and "predict.checkpoints is set" in r.stdout, r.stdout
        assert not (Path(folds3["output_dir"]) / "sample_tiny_cpu" / "logs").exists()


def test_make_passes_gpus_to_train_all_and_train_bundle():
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")}
    make = ["make", "-s", "-n", "-C", str(ROOT)]
    out = subprocess.run([*make, "train-all", "GPUS=0 0 1"], capture_output=True, text=True, env=env).stdout
    assert "--fold 0,1,2,3,4" in out and "--gpus 0,0,1" in out
    out = subprocess.run([*make, "train-bundle", "CONFIGS=configs/recipes/tiny_cpu.yaml", "TIME_LIMIT=60", "GPUS=2"],
                         capture_output=True, text=True, env=env).stdout
    assert "--time-limit 60" in out and "--gpus 2" in out
    assert "--gpus" not in subprocess.run([*make, "train-all"], capture_output=True, text=True, env=env).stdout
