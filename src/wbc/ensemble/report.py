"""Ensemble report: per-class F1 after each step (members, blend, tuned rule), scores, tuned parameters."""
from __future__ import annotations

import numpy as np

from ..console import print_table
from ..metrics import per_class_f1
from .tune import macro_f1_fast


def step_scores(y: np.ndarray, preds: dict[str, np.ndarray], classes: list[str]) -> dict:
    """{step: {"macro_f1": f, "per_class_f1": {class: f1}}} for each step's predictions."""
    n = len(classes)
    return {step: {"macro_f1": macro_f1_fast(y, p, n),
                   "per_class_f1": dict(zip(classes, map(float, per_class_f1(y, p, n))))}
            for step, p in preds.items()}


def print_per_class(title: str, y: np.ndarray, scores: dict, classes: list[str]) -> None:
    steps = list(scores)
    support = np.bincount(y, minlength=len(classes))
    rows = [[c, int(support[i])] + [scores[s]["per_class_f1"][c] for s in steps] for i, c in enumerate(classes)]
    rows.append(["macro-F1", int(support.sum())] + [scores[s]["macro_f1"] for s in steps])
    print_table(title, ["class", "n"] + steps, rows)


def print_summary(report: dict) -> None:
    oof, ev = report["scores"]["oof"], report["scores"].get("eval") or {}
    nested = {"blend": report["scores"].get("oof_nested_blend"), list(oof)[-1]: report["scores"].get("oof_nested")}
    rows = []
    for step in oof:
        mark = " (submitted)" if step == report["final_step"] else ""
        rows.append([step + mark, oof[step]["macro_f1"], "" if nested.get(step) is None else nested[step],
                     ev[step]["macro_f1"] if step in ev else ""])
    print_table("macro-F1 by step (OOF in-sample, OOF nested = tuned on K-1 folds, phase2_eval)",
                ["step", "OOF", "OOF nested", "eval"], rows)


def print_rule(rule: dict, weights: dict, tuned: dict) -> None:
    classes = rule["classes"]
    rows = [[c, rule["prior"][c], rule["bias"][c], rule["thresholds"].get(c, "")] for c in classes]
    print_table(f"tuned rule (quota {rule['quota']:.3f}, tau {tuned.get('tau', 0.0):.3f})",
                ["class", "prior", "bias", "threshold"], rows)
    print_table("blend weights", ["member", "weight"], [[m, w] for m, w in weights.items()])
