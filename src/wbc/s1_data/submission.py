"""The competition's submission format: `ID,labels` for exactly the IDs of the test split, plus a JSON sidecar.
Every step that submits (a run, an ensemble, a refinement) writes through `write_submission`."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.config import resolve_path
from ..core.console import console
from ..core.errors import WBCError
from ..core.io import atomic_path, json_text, read_csv
from .layout import class_list, read_split


def validate_submission(df: pd.DataFrame, test_ids, classes, source: str = "submission") -> None:
    """IDs must match the test split exactly (no missing, extra or duplicate), labels must be class codes."""
    if list(df.columns) != ["ID", "labels"]:
        raise WBCError(f"{source}:1: columns must be ID,labels (found {','.join(map(str, df.columns))})")
    ids = df["ID"].astype(str)
    dup = ids.duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise WBCError(f"{source}:{i + 2}: duplicate ID {ids.iloc[i]!r}")
    test = set(map(str, test_ids))
    extra = ~ids.isin(test)
    if extra.any():
        i = int(np.flatnonzero(extra.to_numpy())[0])
        raise WBCError(f"{source}:{i + 2}: ID {ids.iloc[i]!r} is not in the test split")
    missing = sorted(test - set(ids))
    if missing:
        raise WBCError(f"{source}: {len(missing)} test IDs missing, e.g. {missing[0]!r}")
    labels = df["labels"].astype(str)
    bad = ~labels.isin(list(classes))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise WBCError(f"{source}:{i + 2}: label {labels.iloc[i]!r} is not a class code")


def _null_nan(obj):
    """NaN / inf as null: JSON has no token for them (json.dumps would write a bare NaN)."""
    if isinstance(obj, dict):
        return {k: _null_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_null_nan(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
        return None
    return obj


def submission_classes(cfg: dict, classes, source) -> list[str]:
    """The dataset's class codes, checked against those a step predicts: a submission over other classes would
    pass a check against its own classes and never predict the dataset's missing ones."""
    want = class_list(cfg)
    if set(classes) != set(want):
        raise WBCError(f"{source}: predicts classes {','.join(classes)}, but the dataset's are {','.join(want)}; "
                       "a submission needs them all (a specialist is composed through ensemble.specialists)")
    return want


def write_submission(data_root, ids, labels, name: str, classes, sidecar: dict,
                     out_dir="submissions", source: str = "submission") -> Path:
    """Validate and write `<out_dir>/<name>.csv` and `<name>.json`; nothing is written if invalid.
    `source` names where ids / labels came from in validation errors."""
    from ..core.environment import git_commit  # imports torch: here, not at every command's start
    test = read_split(Path(data_root), "phase2_test", check_images=False)
    df = pd.DataFrame({"ID": np.asarray(ids).astype(str), "labels": np.asarray(labels).astype(str)})
    validate_submission(df, test["ID"], classes, source)
    df = df.set_index("ID").loc[test["ID"]].reset_index()  # test-file order
    counts = df["labels"].value_counts()
    odd = mix_warnings(counts / len(df), label_priors(Path(data_root)), classes)
    for line in odd:
        console.print(f"[yellow]warning:[/] {name}: {line}", highlight=False)
    side = json_text(_null_nan({"name": name, "git_commit": git_commit(), "n": len(df),
                                "predicted_counts": {c: int(counts.get(c, 0)) for c in classes},
                                "class_mix_warnings": odd, **sidecar}))
    path = resolve_path(out_dir) / f"{name}.csv"
    # Both written in full before either is renamed, the sidecar first: a failure never leaves a new CSV
    # beside the sidecar of an older one.
    with atomic_path(path) as tmp_csv, atomic_path(path.with_suffix(".json")) as tmp_json:
        df.to_csv(tmp_csv, index=False)
        tmp_json.write_text(side)
    return path


OVER, UNDER = 3.0, 0.02  # a class predicted > OVER x (and 5 points above) its largest prior; a prior >= UNDER missed


def label_priors(root: Path) -> dict[str, pd.Series]:
    """Each labelled split's class shares (the priors the data gives)."""
    from .layout import LABELLED, SPLITS

    out = {}
    for split in LABELLED:
        if (root / SPLITS[split][0]).exists():
            labels = read_split(root, split, check_images=False)["labels"]
            out[split] = labels.value_counts() / len(labels)
    return out


def mix_warnings(shares: pd.Series, priors: dict[str, pd.Series], classes) -> list[str]:
    """A submission's class mix far from every prior the data gives: a class predicted several times as often as
    any split holds it (a rare class flooding the test: an over-corrected prior, a broken model), or one that a
    split holds often and the submission never predicts."""
    if not priors:
        return []
    out = []
    for c in classes:
        top = max(float(p.get(c, 0.0)) for p in priors.values())
        got = float(shares.get(c, 0.0))
        if got > OVER * top and got - top > 0.05:
            out.append(f"{c} is {got:.1%} of the predictions, at most {top:.1%} of any labelled split")
        elif got == 0 and top >= UNDER:
            out.append(f"{c} is never predicted, {top:.1%} of a labelled split")
    return out


def check_file(path, data_root, classes) -> None:
    """Validate an existing submission CSV (`python -m wbc check-submission`)."""
    df = read_csv(path, "submission", dtype=str, keep_default_na=False)
    test = read_split(Path(data_root), "phase2_test", check_images=False)
    validate_submission(df, test["ID"], classes, source=str(path))
