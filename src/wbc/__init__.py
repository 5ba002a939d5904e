"""WBC: a long-tailed white-blood-cell classification pipeline (WBCBench 2026 layout)."""

__version__ = "0.1.0"
