"""Time-boxed machines (`TIME_LIMIT`): a fold stops at an epoch's end when it would not finish in time and resumes;
a fold that would not fit is not started; `train-bundle`'s backstop interrupts an overrun and still bundles."""
import pytest
import torch

from wbc.core.io import torch_load
from wbc.core.run_folder import run_dir
from wbc.s3_train.inputs import load_fold_data
from wbc.s3_train.loop import train_fold


@pytest.mark.slow
def test_a_deadline_stops_training_at_an_epoch_end_and_a_resume_finishes_it(cfg2, monkeypatch):
    """`--deadline` (make's TIME_LIMIT): at the first epoch's end from which the fold would not finish in time the
    state is saved and DeadlineReached raised; RESUME then ends where an uninterrupted run ends."""
    import wbc.ops.deadline as dl

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
    import wbc.ops.deadline as dl

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


@pytest.mark.slow
def test_a_fold_that_would_not_fit_before_the_deadline_is_not_started(cfg2, capsys):
    import time

    from wbc.__main__ import main
    from wbc.ops.deadline import EXIT_CODE, Deadline, DeadlineReached

    d = Deadline(at=time.time() + 100)
    d.check_fold(1, None)  # the first fold of a process has no estimate: the epoch-end check covers it
    d.check_fold(1, 50.0)
    with pytest.raises(DeadlineReached, match="fold 1 not started: the last fold took 200 s"):
        d.check_fold(1, 200.0)

    cfg = cfg2("train.epochs=1", "predict.tta=1")
    args = ["train-fold", "-c", "configs/recipes/tiny_cpu.yaml", "--fold", "0,1", "--time-limit", "0",
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

    import wbc.ops.fold_runner as runner
    from wbc.ops.deadline import Deadline, DeadlineReached

    cfg = make_cfg(sample_root)
    overrides = [f"data.root={sample_root}", f"output_dir={cfg['output_dir']}"]

    woke = []

    def stuck(cfg, folds, resume, deadline):
        out = run_dir(cfg) / "fold0"
        out.mkdir(parents=True)
        (run_dir(cfg) / "config.yaml").write_text("name: x\n")  # as training writes it first
        (out / "metrics.jsonl").write_text("{}\n")
        (out / "state.pt").write_text("x")
        time.sleep(60)
        woke.append(True)  # only if the alarm did not interrupt the sleep

    monkeypatch.setattr(runner, "train_folds", stuck)
    with pytest.raises(DeadlineReached, match="interrupted"):
        runner.train_bundle(["configs/recipes/tiny_cpu.yaml"], overrides, [0], False, Deadline(time.time()),
                            tmp_path / "b", kill_after_s=1)
    assert not woke
    with tarfile.open(tmp_path / "b" / "sample_tiny_cpu.tar.gz") as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
    assert names == {"sample_tiny_cpu/config.yaml", "sample_tiny_cpu/fold0/metrics.jsonl"}


def test_the_deadline_counts_every_prediction_the_fold_will_make(cfg2, monkeypatch):
    """A specialist predicts the whole fold, not only its classes, and BatchNorm adaptation adds a pass per split:
    both count in the time the fold still needs."""
    import time

    import wbc.ops.deadline as dl

    seen = []
    real = dl.Deadline.must_stop
    monkeypatch.setattr(dl.Deadline, "must_stop", lambda self, *a: seen.append(a[3]) or real(self, *a))
    cfg = cfg2("train.epochs=1", "predict.tta=2", "predict.adapt_bn=0.5", "data.subset_classes=[LY, SNE, MY]")
    data = load_fold_data(cfg)
    train_fold(cfg, 0, data=data, deadline=dl.Deadline(at=time.time() + 3600))
    n = int((data.pool["fold"] == 0).sum()) + len(data.holdout) + len(data.test)
    fold_rows = data.pool[data.pool["fold"] == 0]
    assert seen == [3 * n] and len(fold_rows) > int(data.in_classes(fold_rows).sum())  # beyond its classes
