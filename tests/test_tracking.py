"""Training curves: per-epoch TensorBoard event files written through the loop's hook, and `make curves` pictures
drawn from each fold's metrics.jsonl."""
import json

import pytest

from wbc.core.errors import WBCError
from wbc.core.run_folder import write_metrics
from wbc.ops.curves import draw_curves


def _scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_each_epoch_reaches_tensorboard_and_a_resume_replaces_the_epochs_after_its_restart(cfg2):
    from wbc.core.run_folder import run_dir
    from wbc.ops.deadline import Deadline
    from wbc.ops.fold_runner import train_folds

    cfg = cfg2("train.epochs=2", "predict.tta=1")
    train_folds(cfg, [0], resume=False, deadline=Deadline())
    fold = run_dir(cfg) / "fold0"
    logged = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    got = _scalars(fold / "tensorboard", "val_macro_f1")
    assert [s for s, _ in got] == [0, 1]
    assert [v for _, v in got] == pytest.approx([r["val_macro_f1"] for r in logged], rel=1e-6)
    assert [s for s, _ in _scalars(fold / "tensorboard", "lr")] == [0, 1]
    off = cfg2("train.epochs=1", "predict.tta=1", "train.tracker=none", "name=off")
    train_folds(off, [0], resume=False, deadline=Deadline())
    assert not (run_dir(off) / "fold0" / "tensorboard").exists()


def test_curves_draw_every_fold_and_need_a_logged_epoch(tmp_path):
    import cv2

    run = tmp_path / "myrun"
    with pytest.raises(WBCError, match="no fold has logged an epoch yet"):
        draw_curves(run)
    for k in (0, 1):
        write_metrics(run / f"fold{k}", [{"epoch": e, "stage": 1 if e < 3 else 2, "train_loss": 2 - e / 4,
                                          "val_loss": 1.5 - e / 5, "val_macro_f1": 0.3 + e / 10, "lr": 1e-3 / (e + 1)}
                                         for e in range(4)])
    (run / "dataset.json").write_text(json.dumps({"dataset": "pbcbench"}))
    png = draw_curves(run)
    img = cv2.imread(str(png))
    assert png == run / "curves.png" and img.shape[1] > 2 * img.shape[0]  # three panels side by side
