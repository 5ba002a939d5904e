"""Ensembling: blend runs' probabilities, tune a macro-F1 decision rule with Optuna, tune training-time
class handling (`tune-train`). The refinement step re-applies the rule with `apply_rule` / `load_rule`."""
from .decision import apply_rule, load_rule

__all__ = ["apply_rule", "load_rule"]
