"""Atomic writes (temp file in the same folder, then rename) and ID-keyed probability files.

Probability files are the contract between pipeline steps (train/embed -> ensemble -> refine -> submit):
a CSV with `ID`, optional `fold`, optional `labels` (ground truth, empty when unknown) and one
`prob_<CLASS>` column per class, in class order.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import WBCError, first_line

PROB_PREFIX = "prob_"
_UMASK = os.umask(0)
os.umask(_UMASK)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> bytes:
    return hashlib.sha1(Path(path).read_bytes()).digest()  # keyed by size and mtime: hashed once per version


def fingerprint(paths) -> str:
    """Short hash of the files' contents (a missing file counts as missing): a cache key for what made a cache."""
    h = hashlib.sha1()
    for p in map(Path, paths):
        st = p.stat() if p.exists() else None
        h.update(p.name.encode() + (_digest(str(p), st.st_size, st.st_mtime_ns) if st else b"missing"))
    return h.hexdigest()[:12]


def file_digest(path) -> str:
    """Short hash of one file's content alone (unlike `fingerprint`, its name left out: a copy has the same)."""
    st = Path(path).stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns).hex()[:12]


TEMP = re.compile(r"\..+\.tmp(\d+)-.*")  # a temporary file of atomic_path: `.<name>.tmp<writer pid>-<random>`


def is_temp(name: str) -> bool:
    return TEMP.fullmatch(name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_temps(folder) -> list[Path]:
    """Remove the temporary files (and folders: an unbundle's) of writers that died before renaming them (a kill -9,
    a power cut): they would otherwise stay forever and travel in bundles. A live writer's are kept."""
    gone = []
    with contextlib.suppress(FileNotFoundError):
        for p in Path(folder).iterdir():
            m = TEMP.fullmatch(p.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                    gone.append(p)
    return gone


def temp_name(path) -> str:
    """A temporary name for `path` in its folder that `clean_stale_temps` removes once this process is dead."""
    return f".{Path(path).name}.tmp{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds. Dead writers'
    temporary files in that folder are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_name(path), suffix=suffix or path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should be shareable like any file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_text(obj) -> str:
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def write_json(path, obj) -> None:
    write_text(path, json_text(obj))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_json(path, what: str = "file", kind: type = dict):
    """json.loads of `path`, with a missing, unreadable or malformed file, or one that does not hold a `kind` (an
    object by default), as one WBCError line."""
    path = Path(path)
    if not path.is_file():
        raise WBCError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # bad JSON or bad UTF-8
        raise WBCError(f"{path}: not readable JSON ({first_line(e)[:160]}); it may be truncated or edited: "
                       "delete it and run the step that writes it again") from None
    if not isinstance(data, kind):
        raise WBCError(f"{path}: holds a JSON {type(data).__name__}, not the {kind.__name__} it should")
    return data


def read_json_or_none(path):
    """A JSON object file, or None when it is missing, unreadable or holds no object (a cache key to rebuild, a
    record to report as unknown)."""
    try:
        return read_json(path)
    except WBCError:
        return None


def read_csv(path, what: str = "file", **kwargs) -> pd.DataFrame:
    """pd.read_csv, with a missing file, a folder, an empty or malformed file as one WBCError line."""
    path = Path(path)
    if not path.exists():
        raise WBCError(f"{path}: {what} not found")
    if not path.is_file():
        raise WBCError(f"{path}: {what} is not a regular file")
    try:
        df = pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        why = first_line(e)
        raise WBCError(f"{path}: not a readable CSV ({why})") from None
    if not isinstance(df.index, pd.RangeIndex):  # every row had one field too many: pandas made column 1 an index
        raise WBCError(f"{path}:2: more fields than the header")
    return df


def require_columns(df: pd.DataFrame, path, columns) -> None:
    """One error line naming the file's header when a column is missing (or renamed)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise WBCError(f"{path}:1: missing column(s) {', '.join(missing)} (found {', '.join(map(str, df.columns))})")


def write_csv(path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def save_png(path, rgb) -> None:
    """An RGB uint8 image as PNG, written atomically."""
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(buf.tobytes())


def torch_save(path, obj) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def torch_load(path):
    """A plain state file (tensors, numbers, strings), never code: weights_only. An unreadable or truncated file
    is one error line naming it."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WBCError(f"{path}: not found") from None
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise WBCError(f"{path}: unreadable checkpoint ({first_line(e)[:160]}); it may be truncated (a full "
                       "disk, a killed copy) or not a plain state_dict: delete it and train again") from None


@dataclass
class Probs:
    """Class probabilities keyed by image ID (rows aligned with `ids`)."""

    ids: np.ndarray  # str, shape (n,)
    probs: np.ndarray  # float, shape (n, n_classes), rows sum to 1
    classes: list[str]
    folds: np.ndarray | None = None  # int, shape (n,), for out-of-fold files
    labels: np.ndarray | None = None  # str, shape (n,), '' when unknown

    def __post_init__(self):
        self.ids = np.asarray(self.ids).astype(str)
        self.probs = np.asarray(self.probs, dtype=np.float64)
        if self.probs.shape != (len(self.ids), len(self.classes)):
            raise WBCError(f"probabilities have shape {self.probs.shape}, "
                           f"expected ({len(self.ids)}, {len(self.classes)})")
        if self.folds is not None:
            self.folds = np.asarray(self.folds).astype(int)
        if self.labels is not None:
            self.labels = np.asarray(pd.Series(self.labels).fillna("").astype(str))

    def to_frame(self) -> pd.DataFrame:
        cols = {"ID": self.ids}
        if self.folds is not None:
            cols["fold"] = self.folds
        if self.labels is not None:
            cols["labels"] = self.labels
        df = pd.DataFrame(cols)
        probs = pd.DataFrame(self.probs, columns=[PROB_PREFIX + c for c in self.classes])
        return pd.concat([df, probs], axis=1)

    def label_index(self) -> np.ndarray:
        """Integer targets; -1 where the label is unknown."""
        if self.labels is None:
            return np.full(len(self.ids), -1)
        lut = {c: i for i, c in enumerate(self.classes)}
        return np.array([lut.get(lbl, -1) for lbl in self.labels])

    def subset(self, mask_or_idx) -> "Probs":
        take = np.asarray(mask_or_idx)
        return Probs(self.ids[take], self.probs[take], list(self.classes),
                     None if self.folds is None else self.folds[take],
                     None if self.labels is None else self.labels[take])

    def align(self, ids) -> "Probs":
        """Rows reordered to `ids`; every ID must be present."""
        pos = pd.Series(np.arange(len(self.ids)), index=self.ids)
        missing = [i for i in ids if i not in pos.index]
        if missing:
            raise WBCError(f"{len(missing)} IDs missing from predictions, e.g. {missing[0]}")
        return self.subset(pos.loc[list(ids)].to_numpy())


def save_probs(path, p: Probs) -> None:
    write_csv(path, p.to_frame())


def load_probs(path, need=()) -> Probs:
    """A probability file; `need` names the optional columns (`fold`, `labels`) the caller requires."""
    path = Path(path)
    df = read_csv(path, "prediction file", dtype={"ID": str, "labels": str}, keep_default_na=False)
    require_columns(df, path, ("ID", *need))
    pcols = [c for c in df.columns if c.startswith(PROB_PREFIX)]
    if not pcols:
        raise WBCError(f"{path}: no {PROB_PREFIX}<class> columns")
    dup = df["ID"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0]) + 2
        raise WBCError(f"{path}:{row}: duplicate ID {df['ID'].iloc[row - 2]}")
    probs = df[pcols].apply(pd.to_numeric, errors="coerce").to_numpy(float)  # '' and text become NaN
    bad = ~np.isfinite(probs)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise WBCError(f"{path}:{r + 2}: {pcols[c]} is {str(df[pcols[c]].iloc[r])!r}, not a finite probability")
    folds = None
    if "fold" in df.columns:
        folds = pd.to_numeric(df["fold"], errors="coerce").to_numpy(float)
        bad = ~np.isfinite(folds) | (folds != np.round(folds))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise WBCError(f"{path}:{r + 2}: fold is {str(df['fold'].iloc[r])!r}, not a fold number")
    return Probs(df["ID"].to_numpy(), probs, [c[len(PROB_PREFIX):] for c in pcols], folds,
                 df["labels"].to_numpy() if "labels" in df.columns else None)
