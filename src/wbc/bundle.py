"""`bundle`: pack a run's predictions, metrics and config, without checkpoints, into one .tar.gz.

Folds trained on other machines (a lent GPU, a notebook) come back this way; untarred into `outputs/`, `make predict`
merges them and `make ensemble` blends them.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from .errors import WBCError
from .io import atomic_path

LEFT_OUT = ".pt"  # checkpoints: hundreds of MB, and the predictions already hold what blending needs


def bundle_run(run: Path, dest: Path) -> Path:
    """`dest/<run name>.tar.gz` holding `run/` (paths start with the run's name), checkpoints left out."""
    run = Path(run)
    if not run.is_dir():
        raise WBCError(f"bundle: {run}: not a folder (give a run folder, outputs/<name>)")
    path = Path(dest) / f"{run.name}.tar.gz"
    with atomic_path(path, suffix=".gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(run, arcname=run.name, filter=lambda m: None if m.name.endswith(LEFT_OUT) else m)
    return path


def register(sub) -> None:
    p = sub.add_parser("bundle", help="pack a run folder without checkpoints into DEST/<name>.tar.gz")
    p.add_argument("--run", type=Path, required=True, help="the run folder, outputs/<name>")
    p.add_argument("--dest", type=Path, default=Path("outputs/bundles"))

    def run(args):
        print(bundle_run(args.run, args.dest))

    p.set_defaults(func=run)
