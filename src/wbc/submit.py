"""The submission writer: `ID,labels` for exactly the IDs of phase2_test.csv, plus a JSON sidecar."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .config import display_path, resolve_path, run_dir
from .errors import WBCError
from .io import atomic_path, write_json


def validate_submission(df: pd.DataFrame, test_ids, classes, source: str = "submission") -> None:
    """IDs must match the test split exactly (no missing, extra or duplicate), labels must be class codes."""
    if list(df.columns) != ["ID", "labels"]:
        raise WBCError(f"{source}:1: columns must be ID,labels (found {','.join(map(str, df.columns))})")
    ids = df["ID"].astype(str)
    dup = ids.duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise WBCError(f"{source}:{i + 2}: duplicate ID {ids.iloc[i]}")
    test = set(map(str, test_ids))
    extra = ~ids.isin(test)
    if extra.any():
        i = int(np.flatnonzero(extra.to_numpy())[0])
        raise WBCError(f"{source}:{i + 2}: ID {ids.iloc[i]} is not in the test split")
    missing = sorted(test - set(ids))
    if missing:
        raise WBCError(f"{source}: {len(missing)} test IDs missing, e.g. {missing[0]}")
    bad = ~df["labels"].astype(str).isin(list(classes))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise WBCError(f"{source}:{i + 2}: label '{df['labels'].iloc[i]}' is not a class code")


def write_submission(data_root, ids, labels, name: str, classes, sidecar: dict,
                     out_dir="submissions") -> Path:
    """Validate and write `<out_dir>/<name>.csv` and `<name>.json`; nothing is written if invalid."""
    from .data.layout import read_split
    from .environment import git_commit  # imports torch: here, not at every command's start

    test = read_split(Path(data_root), "phase2_test", check_images=False)
    df = pd.DataFrame({"ID": np.asarray(ids).astype(str), "labels": np.asarray(labels).astype(str)})
    validate_submission(df, test["ID"], classes)
    df = df.set_index("ID").loc[test["ID"]].reset_index()  # test-file order
    out = resolve_path(out_dir)
    path = out / f"{name}.csv"
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    counts = df["labels"].value_counts()
    write_json(out / f"{name}.json", {"name": name, "git_commit": git_commit(), "n": len(df),
                                      "predicted_counts": {c: int(counts.get(c, 0)) for c in classes},
                                      **sidecar})
    return path


def check_file(path, data_root, classes) -> None:
    """Validate an existing submission CSV (`python -m wbc check-submission`)."""
    from .data.layout import read_split

    path = Path(path)
    if not path.exists():
        raise WBCError(f"{path}: submission not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
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
        df = pd.read_csv(decided, dtype=str, keep_default_na=False)
        ids, labels, rule = df["ID"], df["labels"], "tuned decision rule (test_pred.csv)"
    else:
        probs = load_probs(pred_dir / "test.csv")
        if set(probs.classes) < set(classes):
            raise WBCError(f"{pred_dir / 'test.csv'}: a specialist's predictions (classes {', '.join(probs.classes)}) "
                           "cannot be submitted alone; compose it with full-class runs (ensemble.specialists)")
        ids, labels, rule = probs.ids, np.asarray(probs.classes)[probs.probs.argmax(1)], "argmax of test.csv"
    report = pred_dir / "report.json"
    sidecar = {"predictions": display_path(pred_dir), "decision": rule, **(extra or {})}
    if report.exists():
        rep = json.loads(report.read_text())
        sidecar["cv_macro_f1"] = rep.get("oof", {}).get("macro_f1")
        sidecar["eval_macro_f1"] = rep.get("eval", {}).get("macro_f1")
        sidecar["folds"] = rep.get("folds")
        sidecar["report"] = rep
    cfg_file = pred_dir / "config.yaml"
    if cfg_file.exists():
        sidecar["config"] = cfg_file.read_text()
    return write_submission(data_root, ids, labels, name, classes, sidecar, out_dir)


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
