"""Ensemble report: per-class F1 after each step (members, blend, tuned rule), scores, tuned parameters."""
from __future__ import annotations

import numpy as np

from ..core.console import print_table
from ..core.metrics import macro_f1, per_class_f1

NO_SPECIALIST = "blend w/o specialists"  # the ensemble step before `ensemble.specialists` are composed in


def step_scores(y: np.ndarray, preds: dict[str, np.ndarray], classes: list[str]) -> dict:
    """{step: {"macro_f1": f, "per_class_f1": {class: f1}}} for each step's predictions."""
    n = len(classes)
    return {step: {"macro_f1": macro_f1(y, p, n),
                   "per_class_f1": dict(zip(classes, map(float, per_class_f1(y, p, n))))}
            for step, p in preds.items()}


def print_per_class(title: str, y: np.ndarray, scores: dict, classes: list[str]) -> None:
    steps = list(scores)
    support = np.bincount(y, minlength=len(classes))
    rows = [[c, int(support[i])] + [scores[s]["per_class_f1"][c] for s in steps] for i, c in enumerate(classes)]
    rows.append(["macro-F1", int(support.sum())] + [scores[s]["macro_f1"] for s in steps])
    print_table(title, ["class", "n"] + steps, rows)


def print_summary(report: dict) -> None:
    sc = report["scores"]
    oof, ev, shifted = sc["oof"], sc.get("eval") or {}, sc.get("oof_shift_weighted")
    last = list(oof)[-1]
    nested = {NO_SPECIALIST: sc.get("oof_nested_no_specialist"), "blend": sc.get("oof_nested_blend"),
              last: sc.get("oof_nested")}
    nested_w = {"blend": sc.get("oof_nested_blend_shift_weighted"), last: sc.get("oof_nested_shift_weighted")}
    rows = []
    for step in oof:
        mark = " (submitted)" if step == report["final_step"] else ""
        row = [step + mark, oof[step]["macro_f1"], "" if nested.get(step) is None else nested[step]]
        if shifted:
            row += [shifted[step], "" if nested_w.get(step) is None else nested_w[step]]
        rows.append(row + [ev[step]["macro_f1"] if step in ev else ""])
    cols = (["step", "OOF", "OOF nested"] + (["OOF shift-weighted", "nested shift-weighted"] if shifted else [])
            + ["eval"])
    print_table("macro-F1 by step (OOF in-sample; nested = blend and rule fitted on K-1 folds"
                + (", shift-tuned" if report.get("shift_tuned") else "") + "; phase2_eval)", cols, rows)


def print_rule(rule: dict, weights: dict, tuned: dict, specialists: list[dict] = ()) -> None:
    classes = rule["classes"]
    rows = [[c, rule["prior"][c], rule["bias"][c], rule["thresholds"].get(c, "")] for c in classes]
    print_table(f"tuned rule (quota {rule['quota']:.3f}, tau {tuned.get('tau', 0.0):.3f})",
                ["class", "prior", "bias", "threshold"], rows)
    print_table("blend weights", ["member", "weight"], [[m, w] for m, w in weights.items()])
    if specialists:
        print_table("specialists (fitted weight of their split of the group)",
                    ["specialist", "classes", "weight", "kept"],
                    [[s["name"], " ".join(s["classes"]), s["weight"], "yes" if s["kept"] else "no (nested)"]
                     for s in specialists])
