"""`make ensemble`: blend members, tune the decision rule on OOF, estimate it honestly, write predictions,
the report and the submission. Outputs go to `<output_dir>/ensemble/<name>/` (see docs/ensemble.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.config import display_path, dump_config, resolve_path
from ..core.console import console
from ..core.errors import WBCError
from ..core.io import Probs, read_csv, save_probs, write_csv, write_json, write_text
from ..core.metrics import macro_f1, save_confusion_png
from ..core.run_folder import outputs_together
from .blend import SPACES, blend, check_members, load_member, resolve_weights
from .decision import apply_rule, class_prior, make_rule
from .report import NO_SPECIALIST, print_per_class, print_rule, print_summary, step_scores
from .specialist import apply_specialists, fit_specialists, load_specialist, nested_check
from .tune import RuleSpace, make_storage, n_finished, nested_estimate, tune_rule


def _member_names(members) -> list[str]:
    short = [Path(m.name).name for m in members]
    return short if len(set(short)) == len(short) else [m.name for m in members]


def _member_path(m):
    """A member's (or specialist's) run folder, or the list of its seed group's run folders."""
    return display_path(m.path) if not m.parts else [display_path(p) for p in m.parts]


def rule_steps(rule: dict) -> list[tuple[str, dict]]:
    """The tuned rule built up one part at a time: bias, thresholds, confusion pairs, quota (those it uses)."""
    steps = [("+bias", dict(rule, thresholds={}, quota=0.0, pairs={}))]
    if rule["thresholds"]:
        steps.append(("+thresholds", dict(rule, quota=0.0, pairs={})))
    if rule.get("pairs"):
        steps.append(("+pairs", dict(rule, quota=0.0)))
    if rule["quota"] > 0:
        steps.append(("+quota", rule))
    return steps


def load_shift_weights(path, ids) -> np.ndarray:
    """Per-image weights (`make shift`'s weights.csv: ID, weight) aligned to `ids`, scaled to mean 1."""
    path = resolve_path(path)
    df = read_csv(path, "shift weights file (run `make shift` first)", dtype={"ID": str})
    if not {"ID", "weight"} <= set(df.columns):
        raise WBCError(f"{path}:1: expected columns ID and weight, found {', '.join(df.columns)}")
    w = df.drop_duplicates("ID").set_index("ID")["weight"].reindex(list(ids))
    if w.isna().any():
        raise WBCError(f"{path}: no weight for OOF image {w.index[w.isna().to_numpy()][0]} "
                       f"({int(w.isna().sum())} missing); recompute it for this pool")
    bad = (w < 0) | ~np.isfinite(w)
    if bad.any():
        raise WBCError(f"{path}: weight of {w.index[bad.to_numpy()][0]} is {w[bad].iloc[0]}; weights must be >= 0")
    return w.to_numpy(float) / w.mean()


def _with_probs(p: Probs, probs: np.ndarray) -> Probs:
    return Probs(p.ids, probs, list(p.classes), p.folds, p.labels)


# what an ensemble writes into outputs/ensemble/<name>/ (the Optuna journal stays: studies resume from it)
OUTPUTS = ("oof.csv", "eval.csv", "test.csv", "*_pred.csv", "decision.json", "report.json", "config.yaml",
           "confusion_*.png")


def _pred_frame(ids, pred, classes) -> pd.DataFrame:
    return pd.DataFrame({"ID": ids, "labels": np.asarray(classes)[pred]})


def _submit(cfg, out, test, test_pred, classes, sub_classes, decision, scores, final_step, folds) -> Path:
    from ..s1_data.layout import data_root
    from ..s1_data.submission import write_submission

    ev = scores["eval"][final_step]["macro_f1"] if "eval" in scores else None
    sidecar = {"step": "ensemble", "name": cfg["name"], "members": decision["members"], "blend": decision["blend"],
               "specialists": decision["specialists"], "decision": display_path(out / "decision.json"),
               "oof_macro_f1": scores["oof"][final_step]["macro_f1"],
               "oof_nested_macro_f1": scores["oof_nested_blend" if final_step == "blend" else "oof_nested"],
               # the step above was chosen on these same folds (select: nested): both estimates, for the record
               "oof_nested_blend": scores["oof_nested_blend"], "oof_nested_rule": scores["oof_nested"],
               "shift_weights": decision["shift_weights"], "folds": folds, "eval_macro_f1": ev}
    path = write_submission(data_root(cfg), test.ids, [classes[i] for i in test_pred], cfg["name"], sub_classes,
                            sidecar, out_dir=resolve_path(cfg["ensemble"]["submit_dir"]))
    console.print(f"submission: {path}")
    return path


def run_ensemble(cfg: dict) -> dict:
    """`cfg` as `load_config` resolves it: every key of the `ensemble` section has its base.yaml default."""
    ens = cfg["ensemble"]
    if not ens["members"]:
        raise WBCError("ensemble.members: list the run folders to blend (e.g. outputs/<run>)")
    name = cfg["name"]
    out = resolve_path(cfg["output_dir"]) / "ensemble" / name
    bcfg, tcfg = ens["blend"], ens["tuning"]
    if tcfg["select"] not in ("nested", "tuned"):
        raise WBCError(f"ensemble.tuning.select: '{tcfg['select']}' is not nested or tuned")
    space = bcfg["space"]
    if space not in SPACES:
        raise WBCError(f"ensemble.blend.space: '{space}' is not one of {', '.join(SPACES)}")

    folds = ens["folds"]
    if folds is not None:
        if not isinstance(folds, list) or len(set(folds)) < 2 or not all(isinstance(f, int) for f in folds):
            raise WBCError(f"ensemble.folds: {folds!r} is not a list of two or more fold numbers (or null: all)")
        console.print(f"[yellow]ensemble.folds:[/] blending on folds {', '.join(map(str, folds))} only: OOF "
                      "scores, weights and rule come from those folds, and each member's test predictions are the "
                      "mean of its own folds' models")
    members = check_members([load_member(m, space, folds) for m in ens["members"]])
    names = _member_names(members)
    specs = [load_specialist(s, members[0], folds) for s in ens["specialists"] or []]
    spec_names = _member_names(specs)
    # Test-shift weights (`make shift`) always add shift-weighted scores; with `shift_tune` (default) the blend
    # weights, the rule, the nested estimate and the selection also aim at the target's damage mix.
    sw = load_shift_weights(ens["shift_weights"], members[0].oof.ids) if ens["shift_weights"] else None
    fit_sw = sw if ens["shift_tune"] else None
    wspec = bcfg["weights"]
    weights, how = resolve_weights(wspec, members, space, fit_sw)
    oof, ev, test = blend(members, weights, space)
    classes, n_cls = oof.classes, len(oof.classes)
    if ens["submit"]:
        from ..s1_data.submission import submission_classes

        sub_classes = submission_classes(cfg, classes, f"ensemble {name}")  # before any output is written
    y = oof.label_index()
    plain = {"oof": oof, "eval": ev}  # the blend before the specialists are composed in
    spec_fit, select = ens["specialist_fit"], ens["specialist_select"]
    if select not in ("nested", "always"):
        raise WBCError(f"ensemble.specialist_select: '{select}' is not nested or always")
    spec_oof, spec_groups = [s.oof.probs for s in specs], [s.group for s in specs]
    spec_weights = fit_specialists(oof.probs, spec_oof, spec_groups, y, fit_sw, spec_fit)
    kept, spec_check = specs, None
    if specs:
        spec_check = nested_check([m.oof.probs for m in members], y, oof.folds, spec_oof, spec_groups,
                                  weights=weights if wspec != "fit" else None, blend_space=space,
                                  sample_weight=fit_sw, fit=spec_fit)
        if select == "nested" and spec_check["with"] <= spec_check["without"]:
            kept = []  # out of sample they do not beat the blend alone: leave them out, as the rule step does
            console.print(f"[yellow]specialists left out[/]: nested blend macro-F1 {spec_check['with']:.4f} with them, "
                          f"{spec_check['without']:.4f} without")
    groups = [s.group for s in kept]
    if kept:
        oof, ev, test = (_with_probs(p, apply_specialists(p.probs, [getattr(s, split).probs for s in kept], groups,
                                                          spec_weights)) if p is not None else None
                         for p, split in ((oof, "oof"), (ev, "eval"), (test, "test")))
    prior = class_prior(y, n_cls)

    rspace = RuleSpace.from_cfg(tcfg)
    seed = int(cfg["seed"] if tcfg["seed"] is None else tcfg["seed"])
    n_trials = int(tcfg["n_trials"])
    storage_spec = tcfg["storage"] or f"journal:{out / 'optuna.journal'}"
    storage = make_storage(storage_spec)
    console.print(f"[bold]ensemble {name}[/]: {len(members)} member(s), {len(y)} OOF / "
                  f"{0 if ev is None else len(ev.ids)} eval / {len(test.ids)} test rows; storage {storage_spec}")
    rule, study = tune_rule(oof.probs, y, classes, rspace, storage=storage, study_prefix=f"ensemble-{name}",
                            n_trials=n_trials, seed=seed, prior=prior, sample_weight=fit_sw)
    nested = None
    if tcfg["nested"]:
        nested = nested_estimate([m.oof.probs for m in members], y, oof.folds, classes, rspace,
                                 weights=weights if wspec != "fit" else None, blend_space=space, storage=storage,
                                 study_prefix=f"ensemble-{name}-nested", seed=seed,
                                 n_trials=int(tcfg["nested_trials"] or n_trials), sample_weight=fit_sw,
                                 specialists=[s.oof.probs for s in kept], groups=groups, specialist_fit=spec_fit)

    tuned = rule
    steps = rule_steps(rule)
    final_step = steps[-1][0]
    by_nested = nested is not None and tcfg["select"] == "nested"
    if by_nested and nested["blend_macro_f1"] > nested["macro_f1"]:
        # Out of sample the tuned rule loses to the plain blend: submit the blend's argmax instead.
        final_step, rule = "blend", make_rule(classes, np.zeros(n_cls), {}, 0.0, prior)

    def step_preds(split: str, probs: np.ndarray) -> dict:
        preds = {n: getattr(m, split).probs.argmax(1) for n, m in zip(names, members)}
        if specs:
            preds[NO_SPECIALIST] = plain[split].probs.argmax(1)
        preds["blend"] = probs.argmax(1)
        preds.update({s: apply_rule(probs, r) for s, r in steps})
        return preds

    oof_preds = step_preds("oof", oof.probs)
    scores = {"oof": step_scores(y, oof_preds, classes), "oof_nested": None if nested is None else nested["macro_f1"],
              "oof_nested_blend": None if nested is None else nested["blend_macro_f1"],
              "oof_nested_no_specialist": None if spec_check is None else spec_check["without"]}
    if sw is not None:
        scores["oof_shift_weighted"] = {s: macro_f1(y, p, n_cls, sw) for s, p in oof_preds.items()}
        if nested is not None:
            scores["oof_nested_shift_weighted"] = macro_f1(y, nested["pred"], n_cls, sw)
            scores["oof_nested_blend_shift_weighted"] = macro_f1(y, nested["pred_blend"], n_cls, sw)
    eval_labelled = ev is not None and (ev.labels != "").all()
    if ev is not None:
        eval_preds = step_preds("eval", ev.probs)
        if eval_labelled:
            scores["eval"] = step_scores(ev.label_index(), eval_preds, classes)
    test_pred = apply_rule(test.probs, rule)

    weights_by_name = dict(zip(names, map(float, weights)))
    decision = {
        "rule": rule,
        "tuned_params": study.best_params,
        "blend": {"space": space, "weights": weights_by_name, "how": how},
        "specialists": [{"name": n, "path": _member_path(s), "classes": [classes[i] for i in s.group],
                         "weight": w, "fit": spec_fit, "kept": bool(kept)}
                        for n, s, w in zip(spec_names, specs, spec_weights)],
        "specialist_check": spec_check,
        "shift_weights": display_path(resolve_path(ens["shift_weights"])) if sw is not None else None,
        "shift_tuned": fit_sw is not None,
        "members": [_member_path(m) for m in members],
        "folds": folds,
        "study": {"storage": storage_spec, "name": study.study_name, "finished_trials": n_finished(study),
                  "best_value": study.best_value, "seed": seed},
    }
    report = {
        "name": name,
        "final_step": final_step,
        "members": [{"name": n, "path": _member_path(m), "weight": float(w)}
                    for n, m, w in zip(names, members, weights)],
        "specialists": decision["specialists"],
        "scores": scores,
        "nested": None if nested is None else {k: v for k, v in nested.items() if not k.startswith("pred")},
        "n": {"oof": len(y), "eval": 0 if ev is None else len(ev.ids), "test": len(test.ids)},
        "shift_tuned": fit_sw is not None,
        "folds": folds,
    }

    print_per_class("OOF per-class F1 (in-sample)", y, scores["oof"], classes)
    if "eval" in scores:
        print_per_class("phase2_eval per-class F1", ev.label_index(), scores["eval"], classes)
    print_summary(report)
    print_rule(tuned, weights_by_name, study.best_params, decision["specialists"])  # even when the blend is submitted
    with outputs_together(out, OUTPUTS):  # a kill leaves no mix of this run's and an older run's files
        save_probs(out / "oof.csv", oof)
        write_csv(out / "oof_pred.csv", _pred_frame(oof.ids, oof_preds[final_step], classes))
        if nested is not None:  # the same step fitted without each row's fold: what `make shift` scores as OOF
            write_csv(out / "oof_nested_pred.csv",
                      _pred_frame(oof.ids, nested["pred_blend" if final_step == "blend" else "pred"], classes))
        save_confusion_png(out / "confusion_oof.png", y, oof_preds[final_step], classes,
                           title=f"OOF, tuned rule (in-sample) macro-F1 {scores['oof'][final_step]['macro_f1']:.4f}")
        if ev is not None:
            save_probs(out / "eval.csv", ev)
            write_csv(out / "eval_pred.csv", _pred_frame(ev.ids, eval_preds[final_step], classes))
            if eval_labelled:
                f1 = scores["eval"][final_step]["macro_f1"]
                save_confusion_png(out / "confusion_eval.png", ev.label_index(), eval_preds[final_step], classes,
                                   title=f"phase2_eval, tuned rule macro-F1 {f1:.4f}")
        save_probs(out / "test.csv", test)
        write_csv(out / "test_pred.csv", _pred_frame(test.ids, test_pred, classes))
        write_json(out / "decision.json", decision)
        write_text(out / "config.yaml", dump_config(cfg))
        if ens["submit"]:
            report["submission"] = display_path(_submit(cfg, out, test, test_pred, classes, sub_classes, decision,
                                                        scores, final_step, folds))
        write_json(out / "report.json", report)
    console.print(f"ensemble outputs: {out}")
    return report
