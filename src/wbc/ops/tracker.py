"""Per-epoch training curves in TensorBoard event files (`fold<k>/tensorboard/`), written offline through the loop's
per-epoch hook: they travel in bundles and open with `tensorboard --logdir outputs/<run>`. `make curves` draws the
same numbers as PNGs from metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

SCALARS = ("train_loss", "val_loss", "val_macro_f1", "lr", "grad_norm", "train_img_per_s")


class EpochLogger:
    """`on_epoch(epoch, record)` for `train_fold`; a resumed fold drops the events logged past its restart."""

    def __init__(self, fold_dir: Path):
        self.dir, self.writer = Path(fold_dir) / "tensorboard", None

    def __call__(self, epoch: int, rec: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=epoch)
        for key in SCALARS:
            if rec.get(key) is not None:
                self.writer.add_scalar(key, float(rec[key]), epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def chain(*callbacks):
    """One per-epoch hook that calls each of `callbacks` (None skipped) in turn."""
    live = [c for c in callbacks if c is not None]

    def call(epoch: int, rec: dict) -> None:
        for c in live:
            c(epoch, rec)

    return call
