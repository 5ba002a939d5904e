"""The run folder, `<output_dir>/<name>/`, and its fold folders: the one module that knows their layout, so that
training, prediction, the parallel trainer, bundles and the runs table agree on it.

    <run>/config.yaml                 the resolved config
    <run>/fold<k>/                    best.pt last.pt state.pt metrics.jsonl env.json train_result.json
                                      prediction.json oof.csv eval.csv test.csv confusion_oof.png
    <run>/{oof,eval,test}.csv         the fold-merged predictions (`make predict`), report.json
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import resolve_path
from .io import write_text

# What training and prediction write into a fold folder; a fresh start of the fold removes them all, so that a
# run killed before its first save leaves no older run's state to resume, nor its models to count as this run's.
FOLD_RESULTS = ("state.pt", "best.pt", "last.pt", "train_result.json", "oof.csv", "eval.csv", "test.csv",
                "prediction.json", "confusion_oof.png")
METRICS = "metrics.jsonl"


def run_dir(cfg: dict) -> Path:
    """Where a run's outputs live: <output_dir>/<name>."""
    return resolve_path(cfg.get("output_dir", "outputs")) / cfg["name"]


def fold_dir(run: Path, fold: int) -> Path:
    return Path(run) / f"fold{fold}"


def fold_index(path: Path) -> int | None:
    """k of a `fold<k>` folder, None for anything else."""
    name = Path(path).name
    return int(name[4:]) if name.startswith("fold") and name[4:].isdigit() else None


def fold_dirs(run: Path) -> list[Path]:
    """The run's fold folders in fold order."""
    found = [p for p in Path(run).glob("fold*") if p.is_dir() and fold_index(p) is not None]
    return sorted(found, key=fold_index)


def finished(fold: Path) -> bool:
    """Trained to the end and predicted since: oof.csv (written last by the fold's prediction) is no older than
    anything training writes (env.json at each start), so a killed re-run of a finished fold does not count."""
    marks = [fold / n for n in ("oof.csv", "train_result.json", "state.pt", "env.json", METRICS)]
    if not all(m.exists() for m in marks[:2]):
        return False
    return all(marks[0].stat().st_mtime_ns >= m.stat().st_mtime_ns for m in marks[1:] if m.exists())


def read_metrics(folder: Path) -> list[dict]:
    """The per-epoch records of `folder/metrics.jsonl` ([] when there is none yet)."""
    path = Path(folder) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def write_metrics(folder: Path, history: list[dict]) -> None:
    write_text(Path(folder) / METRICS, "".join(json.dumps(r) + "\n" for r in history))
