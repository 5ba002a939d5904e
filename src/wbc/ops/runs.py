"""`runs`: one table of every run and ensemble under the outputs folder: folds trained and predicted, how far an
unfinished fold got, OOF / eval macro-F1, an ensemble's nested estimate, and the submission written from it.
It reads only the files the steps wrote (config.yaml, fold metrics, report.json) and writes runs.json."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.config import display_path, read_yaml, resolve_path
from ..core.console import print_table
from ..core.errors import WBCError
from ..core.io import write_json
from ..core.run_folder import finished, fold_dirs, fold_index, read_metrics


def _json(path: Path):
    """A report's content, or None when it is missing, unreadable or not an object (the table shows it blank)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _fold_state(fold: Path, epochs: int | None) -> str:
    """done (trained, then predicted), predicted (another run's models), or how many epochs ran."""
    if finished(fold):
        return "done"
    if (fold / "oof.csv").exists() and not (fold / "metrics.jsonl").exists():
        return "predicted"
    if (fold / "train_result.json").exists() and not (fold / "state.pt").exists():
        return "trained, not predicted"  # a tune-train trial: scored per epoch, checkpoints deleted
    n = len(read_metrics(fold))
    return f"{n}/{epochs if epochs is not None else '?'} epochs"


def run_row(run: Path) -> dict:
    cfg = read_yaml(run / "config.yaml")  # unreadable: one line naming it
    t = cfg.get("train") or {}
    try:
        epochs = None if "epochs" not in t else int(t["epochs"]) + int((t.get("stage2") or {}).get("epochs") or 0)
    except (TypeError, ValueError):  # an edited config: the table shows "?"
        epochs = None
    if "embed" in cfg:  # an embedding run trains for its own epochs
        epochs = (cfg["embed"] or {}).get("epochs", epochs)
    n_folds = (cfg.get("folds") or {}).get("n_folds")
    states = {fold_index(f): _fold_state(f, epochs) for f in fold_dirs(run)}
    report = _json(run / "report.json") or {}
    return {"name": run.name, "kind": "run", "arch": (cfg.get("model") or {}).get("arch"),
            "folds_done": sorted(k for k, s in states.items() if s in ("done", "predicted")),
            "n_folds": n_folds, "unfinished": {k: s for k, s in states.items() if s not in ("done", "predicted")},
            "oof_macro_f1": (report.get("oof") or {}).get("macro_f1"),
            "oof_complete": report.get("oof_complete"),
            "eval_macro_f1": (report.get("eval") or {}).get("macro_f1"), "nested_macro_f1": None,
            "submission": None}


def ensemble_row(ens: Path) -> dict | None:
    report = _json(ens / "report.json")
    if not report:
        return None
    sc, step = report.get("scores") or {}, report.get("final_step")
    nested = sc.get("oof_nested_blend" if step == "blend" else "oof_nested")
    return {"name": ens.name, "kind": f"ensemble ({step})", "arch": f"{len(report.get('members') or [])} members",
            "folds_done": report.get("folds"), "n_folds": None, "unfinished": {},
            "oof_macro_f1": ((sc.get("oof") or {}).get(step) or {}).get("macro_f1"), "oof_complete": True,
            "eval_macro_f1": ((sc.get("eval") or {}).get(step) or {}).get("macro_f1"),
            "nested_macro_f1": nested, "submission": report.get("submission")}


def collect(root: Path) -> list[dict]:
    rows = [run_row(p) for p in sorted(root.iterdir())
            if p.is_dir() and (p / "config.yaml").exists()
            and (fold_dirs(p) or (p / "report.json").exists())]  # the restorer: neither
    if (root / "ensemble").is_dir():
        rows += [r for r in (ensemble_row(p) for p in sorted((root / "ensemble").iterdir()) if p.is_dir()) if r]
    return rows


def _f1(v) -> str:
    return "" if v is None else f"{v:.4f}"


def show_runs(root) -> list[dict]:
    """Print the table (best OOF first) and write `<root>/runs.json` (model, fold states, submission too)."""
    root = resolve_path(root)
    if not root.is_dir():
        raise WBCError(f"{root}: no such folder (--dir: the runs' folder, outputs/ by default)")
    rows = collect(root)
    table = []
    for r in sorted(rows, key=lambda r: -(r["oof_macro_f1"] or -1)):
        if r["kind"] == "run":
            done = r["folds_done"]
            folds = f"{len(done)}" + (f" of {r['n_folds']}" if r["n_folds"] else "")
            folds += f" ({','.join(map(str, done))})" if done else ""
            folds += "".join(f"; {k}: {s.replace(' epochs', ' ep')}" for k, s in r["unfinished"].items())
            name = r["name"]
        else:
            folds = "all" if r["folds_done"] is None else ",".join(map(str, r["folds_done"]))
            name = f"ensemble/{r['name']}"
        oof = _f1(r["oof_macro_f1"]) + ("" if r["oof_complete"] in (True, None) else " part")
        table.append([name, folds, oof, _f1(r["nested_macro_f1"]), _f1(r["eval_macro_f1"])])
    print_table(f"runs in {display_path(root)}: macro-F1 (part: OOF of the finished folds only)",
                ["run", "folds done", "OOF", "nested", "eval"], table)
    write_json(root / "runs.json", rows)
    return rows


def register(sub) -> None:
    p = sub.add_parser("runs", help="every run and ensemble under outputs/: folds done, OOF / eval macro-F1")
    p.add_argument("--dir", default="outputs", help="the outputs folder (default: outputs)")
    p.set_defaults(func=lambda args: show_runs(args.dir))
