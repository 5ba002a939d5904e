"""`shift`: damage features, test-shift importance weights and the shift-aware report over runs."""
from __future__ import annotations


def register(sub) -> None:
    from ..cli_common import add_config_args, config_from_args

    p = add_config_args(sub.add_parser(
        "shift", help="runs' macro-F1 re-weighted to the target split's damage (covariate-shift weights)"))
    p.add_argument("--runs", nargs="*", default=[], help="run / ensemble / refine folders with oof (and eval) files")
    p.add_argument("--target", default=None, help="split to re-weight towards (default: data.test_split)")
    p.add_argument("--target-quantile", type=float, default=0.0,
                   help="keep only target images at or above this damage-score quantile (validation on a labelled split)")
    p.add_argument("--cap", type=float, default=20.0, help="largest weight, in units of the mean weight")
    p.add_argument("--clean-split", default="phase1", help="undamaged split: the damage score's reference")
    p.add_argument("--workers", type=int, default=2, help="threads computing damage features")

    def run(args):
        from .report import shift_report

        shift_report(config_from_args(args), args.runs, args.target, args.target_quantile, args.cap,
                     args.clean_split, args.workers)

    p.set_defaults(func=run)
