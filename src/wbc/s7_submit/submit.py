"""`make submit` / `make check-submission`: a predictions folder (a run, an ensemble, a refinement) as a validated
`ID,labels` submission with its sidecar, and the check of any submission file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.config import display_path, dump_config, read_yaml
from ..core.errors import WBCError
from ..core.io import read_csv, require_columns
from ..core.run_folder import require_complete, run_dir
from ..s1_data.submission import check_file, write_submission


def submit_from_predictions(pred_dir, data_root, name: str, classes, extra: dict | None = None,
                            out_dir="submissions") -> Path:
    """Submission from a predictions folder: its tuned decisions (`test_pred.csv`) when it has them,
    else the argmax of its fold-averaged `test.csv`. The sidecar carries the folder's report."""
    import json

    from ..core.io import load_probs

    pred_dir = Path(pred_dir)
    require_complete(pred_dir, "make predict / make ensemble / make refine")
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
        sidecar["config"] = _portable_config(cfg_file)
    return write_submission(data_root, ids, labels, name, classes, sidecar, out_dir, str(source))


def _portable_config(cfg_file: Path) -> str:
    """The run's config without this machine's data root (`DATA=` sets it): a committed sidecar names no local path."""
    cfg = read_yaml(cfg_file)
    if isinstance(cfg.get("data"), dict) and cfg["data"].get("root"):
        cfg["data"]["root"] = "<DATA>"
    return dump_config(cfg)


def _macro_f1(rep: dict, part: str):
    scores = rep.get(part)
    return scores.get("macro_f1") if isinstance(scores, dict) else None


def register(sub) -> None:
    from ..core.cli import add_config_args, config_from_args
    from ..core.console import console

    q = add_config_args(sub.add_parser("submit", help="write submissions/<name>.csv from a predictions folder"))
    q.add_argument("--pred", help="predictions folder (default: outputs/<config name>)")
    q.add_argument("--name", help="submission name (default: the run's name, which starts with the dataset's)")

    def run_submit(args):
        from ..core.config import run_name
        from ..core.validate import name_problem
        from ..s1_data.layout import class_list, data_root

        if args.name is not None and name_problem(args.name):
            raise WBCError(f"--name: {name_problem(args.name)}")
        cfg = config_from_args(args)
        pred = Path(args.pred) if args.pred else run_dir(cfg)
        name = args.name or run_name(cfg, cfg["name"])
        path = submit_from_predictions(pred, data_root(cfg), name, class_list(cfg))
        console.print(f"wrote {path}")

    q.set_defaults(func=run_submit)

    p = add_config_args(sub.add_parser("check-submission", help="validate a submission CSV against the test split"))
    p.add_argument("--file", required=True)

    def run(args):
        from ..s1_data.layout import class_list, data_root

        cfg = config_from_args(args)
        check_file(args.file, data_root(cfg), class_list(cfg))
        console.print(f"{args.file}: valid")

    p.set_defaults(func=run)
