"""The submission writer: `ID,labels` for exactly the IDs of phase2_test.csv, plus a JSON sidecar."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .config import display_path, resolve_path, run_dir
from .errors import WBCError
from .io import atomic_path, json_text, read_csv, require_columns


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
    from .data.layout import class_list

    want = class_list(cfg)
    if set(classes) != set(want):
        raise WBCError(f"{source}: predicts classes {','.join(classes)}, but the dataset's are {','.join(want)}; "
                       "a submission needs them all (a specialist is composed through ensemble.specialists)")
    return want


def write_submission(data_root, ids, labels, name: str, classes, sidecar: dict,
                     out_dir="submissions", source: str = "submission") -> Path:
    """Validate and write `<out_dir>/<name>.csv` and `<name>.json`; nothing is written if invalid.
    `source` names where ids / labels came from in validation errors."""
    from .data.layout import read_split
    from .environment import git_commit  # imports torch: here, not at every command's start

    test = read_split(Path(data_root), "phase2_test", check_images=False)
    df = pd.DataFrame({"ID": np.asarray(ids).astype(str), "labels": np.asarray(labels).astype(str)})
    validate_submission(df, test["ID"], classes, source)
    df = df.set_index("ID").loc[test["ID"]].reset_index()  # test-file order
    counts = df["labels"].value_counts()
    side = json_text(_null_nan({"name": name, "git_commit": git_commit(), "n": len(df),
                                "predicted_counts": {c: int(counts.get(c, 0)) for c in classes}, **sidecar}))
    path = resolve_path(out_dir) / f"{name}.csv"
    # Both written in full before either is renamed, the sidecar first: a failure never leaves a new CSV
    # beside the sidecar of an older one.
    with atomic_path(path) as tmp_csv, atomic_path(path.with_suffix(".json")) as tmp_json:
        df.to_csv(tmp_csv, index=False)
        tmp_json.write_text(side)
    return path


def check_file(path, data_root, classes) -> None:
    """Validate an existing submission CSV (`python -m wbc check-submission`)."""
    from .data.layout import read_split

    df = read_csv(path, "submission", dtype=str, keep_default_na=False)
    test = read_split(Path(data_root), "phase2_test", check_images=False)
    validate_submission(df, test["ID"], classes, source=str(path))


def submit_from_predictions(pred_dir, data_root, name: str, classes, extra: dict | None = None,
                            out_dir="submissions") -> Path:
    """Submission from a predictions folder: its tuned decisions (`test_pred.csv`) when it has them,
    else the argmax of its fold-averaged `test.csv`. The sidecar carries the folder's report."""
    import json

    from .io import load_probs

    pred_dir = Path(pred_dir)
    decided = pred_dir / "test_pred.csv"
    if decided.exists():
        df = read_csv(decided, "decisions", dtype=str, keep_default_na=False)
        require_columns(df, decided, ("ID", "labels"))
        ids, labels, rule, source = df["ID"], df["labels"], "tuned decision rule (test_pred.csv)", decided
    else:
        source = pred_dir / "test.csv"
        probs = load_probs(source)
        if set(probs.classes) < set(classes):
            raise WBCError(f"{source}: a specialist's predictions (classes {', '.join(probs.classes)}) "
                           "cannot be submitted alone; compose it with full-class runs (ensemble.specialists)")
        ids, labels, rule = probs.ids, np.asarray(probs.classes)[probs.probs.argmax(1)], "argmax of test.csv"
    report = pred_dir / "report.json"
    sidecar = {"predictions": display_path(pred_dir), "decision": rule, **(extra or {})}
    if report.exists():
        try:
            rep = json.loads(report.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WBCError(f"{report}: not valid JSON ({e})") from None
        if not isinstance(rep, dict):
            raise WBCError(f"{report}: not a JSON object (found {type(rep).__name__})")
        sidecar["cv_macro_f1"] = _macro_f1(rep, "oof")
        sidecar["eval_macro_f1"] = _macro_f1(rep, "eval")
        sidecar["folds"] = rep.get("folds")
        sidecar["report"] = rep
    cfg_file = pred_dir / "config.yaml"
    if cfg_file.exists():
        sidecar["config"] = cfg_file.read_text()
    return write_submission(data_root, ids, labels, name, classes, sidecar, out_dir, str(source))


def _macro_f1(rep: dict, part: str):
    scores = rep.get(part)
    return scores.get("macro_f1") if isinstance(scores, dict) else None


def register(sub) -> None:
    from .cli_common import add_config_args, config_from_args
    from .console import console

    q = add_config_args(sub.add_parser("submit", help="write submissions/<name>.csv from a predictions folder"))
    q.add_argument("--pred", help="predictions folder (default: outputs/<config name>)")
    q.add_argument("--name", help="submission name (default: <dataset>_<config name>)")

    def run_submit(args):
        from .data.layout import class_list, data_root, dataset_name

        cfg = config_from_args(args)
        pred = Path(args.pred) if args.pred else run_dir(cfg)
        name = args.name or f"{dataset_name(cfg)}_{cfg['name']}"
        path = submit_from_predictions(pred, data_root(cfg), name, class_list(cfg))
        console.print(f"wrote {path}")

    q.set_defaults(func=run_submit)

    p = add_config_args(sub.add_parser("check-submission", help="validate a submission CSV against the test split"))
    p.add_argument("--file", required=True)

    def run(args):
        from .data.layout import class_list, data_root

        cfg = config_from_args(args)
        check_file(args.file, data_root(cfg), class_list(cfg))
        console.print(f"{args.file}: valid")

    p.set_defaults(func=run)
