"""Stage 5 of the main path: blend runs' probabilities (seed groups, specialists), tune a macro-F1 decision rule with
Optuna, estimate it nested. The refinement step re-applies the rule with `apply_rule` / `load_rule`."""
from .decision import apply_rule, load_rule

__all__ = ["apply_rule", "load_rule"]
