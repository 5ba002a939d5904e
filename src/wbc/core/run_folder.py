"""The run folder, `<output_dir>/<name>/`, and its fold folders: the one module that knows their layout, so that
training, prediction, the parallel trainer, bundles and the runs table agree on it.

    <run>/config.yaml                 the resolved config
    <run>/fold<k>/                    best.pt last.pt state.pt metrics.jsonl env.json train_result.json
                                      prediction.json oof.csv eval.csv test.csv confusion_oof.png fold.json
    <run>/{oof,eval,test}.csv         the fold-merged predictions (`make predict`), report.json
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .config import resolve_path
from .console import console
from .errors import WBCError, where
from .io import file_digest, read_json, read_json_or_none, write_json, write_text

# What training and prediction write into a fold folder; a fresh start of the fold removes them all, so that a
# run killed before its first save leaves no older run's state to resume, nor its models to count as this run's.
FOLD_RESULTS = ("state.pt", "best.pt", "last.pt", "train_result.json", "oof.csv", "eval.csv", "test.csv",
                "prediction.json", "confusion_oof.png")
METRICS = "metrics.jsonl"
FOLD_RECORD = "fold.json"  # the fold's number, its folds file's digest and the digests of the checkpoints it wrote
WRITING = "WRITING"  # present while a step rewrites its outputs in a folder; a killed step leaves it behind


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
    if not all(m.exists() for m in marks[:2]) or (fold / WRITING).exists():
        return False
    return all(marks[0].stat().st_mtime_ns >= m.stat().st_mtime_ns for m in marks[1:] if m.exists())


def read_metrics(folder: Path) -> list[dict]:
    """The per-epoch records of `folder/metrics.jsonl` ([] when there is none yet). A torn last line (a writer
    killed mid-line) is dropped with a warning; an unreadable line before it is an error naming it."""
    path = Path(folder) / METRICS
    if not path.exists():
        return []
    lines = [(i + 1, line) for i, line in enumerate(path.read_text(errors="replace").splitlines()) if line.strip()]
    records = []
    for n, (row, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        elif n == len(lines) - 1:
            console.print(f"[yellow]warning:[/] {where(path, row)}: a torn last record, dropped", highlight=False)
        else:
            raise WBCError(f"{where(path, row)}: not a JSON record; the file was edited or damaged: delete it and "
                           "train the fold again")
    return records


def start_fold_record(fold: Path, folds_file: Path) -> None:
    """A fresh start's record of what the fold trains: its number and its folds file's content."""
    write_json(Path(fold) / FOLD_RECORD, {"fold": fold_index(fold), "folds": file_digest(folds_file), "weights": []})


def record_weights(fold: Path, digest: str) -> None:
    """Add the digest of a checkpoint about to be renamed into place (a kill in between leaves one never used). A
    fold started before folds kept records gets none: its older checkpoints could not be told apart."""
    path = Path(fold) / FOLD_RECORD
    if path.exists():
        rec = read_json(path)
        write_json(path, {**rec, "weights": [*rec.get("weights", []), digest]})


def check_fold_record(fold: Path, folds_file: Path | None = None, weights: Path | None = None) -> None:
    """Refuse a fold folder whose record says it trained another fold or on another content of `folds_file`, or
    whose `weights` another fold of the run wrote (copied in): either would predict images the model trained on.
    Weights edited or brought in from elsewhere pass, as does a fold trained before folds kept records."""
    fold = Path(fold)
    if weights is not None:
        digest = file_digest(weights)
        for other in fold_dirs(fold.parent):
            rec = other / FOLD_RECORD
            if other != fold and rec.exists() and digest in read_json(rec).get("weights", []):
                raise WBCError(f"{weights}: a checkpoint {other.name} wrote, so fold {fold_index(fold)}'s "
                               "out-of-fold predictions would be leaked: train the fold again")
    path = fold / FOLD_RECORD
    if not path.exists():
        return
    rec, k = read_json(path), fold_index(fold)
    if rec.get("fold") != k:
        raise WBCError(f"{path}: records fold {rec.get('fold')}, not {k} (a fold folder copied or renamed?): train "
                       f"fold {k} again")
    if folds_file is not None and rec.get("folds") != file_digest(folds_file):
        raise WBCError(f"{fold}: trained on another content of {folds_file} (its folds changed since), so its "
                       f"out-of-fold predictions would be leaked: restore that folds file or train fold {k} again")


def write_metrics(folder: Path, history: list[dict]) -> None:
    write_text(Path(folder) / METRICS, "".join(json.dumps(r) + "\n" for r in history))


@contextlib.contextmanager
def outputs_together(folder: Path, owned: tuple[str, ...]):
    """A step's outputs in `folder` change together or not at all: its previous ones (`owned`, glob patterns) are
    removed and a WRITING marker put down first, the marker removed last. A step killed in between leaves no mix of
    old and new files, and readers (`require_complete`) refuse the folder until the step runs again."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / WRITING, "a step is writing this folder's outputs; if none is running, it was killed: "
                                 "run it again\n")
    for pattern in owned:
        for p in folder.glob(pattern):
            if p.is_file():
                p.unlink()
    yield folder
    (folder / WRITING).unlink(missing_ok=True)


def require_complete(folder: Path, rerun: str) -> None:
    """Refuse a folder whose writing step was killed (its WRITING marker is still there)."""
    if (Path(folder) / WRITING).exists():
        raise WBCError(f"{folder}: its outputs are incomplete (the step writing them was stopped): run `{rerun}` "
                       "again")


DATASET = "dataset.json"


def claim(run: Path, record: dict) -> None:
    """A run folder holds one dataset's runs: the first write records `record` (the dataset's name, its folds' and
    classes' fingerprint); a later one with another record is refused before anything is written, so two datasets
    never mix fold models or predictions under one name."""
    path = Path(run) / DATASET
    if path.exists():
        old = read_json_or_none(path)
        if old != record:
            was = (f"{old.get('dataset')} (folds {old.get('folds')})" if isinstance(old, dict)
                   else "an unreadable record")
            raise WBCError(f"{run}: holds runs on {was}; this config's data is {record['dataset']} (folds "
                           f"{record['folds']}): give the run another name (ARGS=name=...) or output_dir")
        return
    write_text(path, json.dumps(record, indent=2) + "\n")
