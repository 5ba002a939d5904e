"""`shift`: damage features, test-shift importance weights and the shift-aware report over runs;
`damage-match`: the training augmentation's damage mix fitted to the target split's damage."""
from __future__ import annotations


def register(sub) -> None:
    from ...core.cli import add_config_args, config_from_args, positive_int

    p = add_config_args(sub.add_parser(
        "shift", help="runs' macro-F1 re-weighted to the target split's damage (covariate-shift weights)"))
    p.add_argument("--runs", nargs="*", default=[], help="run / ensemble / refine folders with oof (and eval) files")
    p.add_argument("--target", default=None, help="split to re-weight towards (default: data.test_split)")
    p.add_argument("--target-quantile", type=float, default=0.0,
                   help="keep only target images at or above this damage-score quantile "
                        "(validation on a labelled split)")
    p.add_argument("--cap", type=float, default=20.0, help="largest weight, in units of the mean weight")
    p.add_argument("--clean-split", default="phase1", help="undamaged split: the damage score's reference")
    p.add_argument("--workers", type=int, default=2, help="threads computing damage features")

    def run(args):
        from .report import shift_report

        shift_report(config_from_args(args), args.runs, args.target, args.target_quantile, args.cap,
                     args.clean_split, args.workers)

    p.set_defaults(func=run)

    m = add_config_args(sub.add_parser(
        "damage-match", help="fit the augmentation's damage mix to the target split's damage features"))
    m.add_argument("--target", default=None, help="split to match (default: data.test_split); labels are not used")
    m.add_argument("--images", type=positive_int, default=1200, help="pool images the proposals are made from")
    m.add_argument("--per-image", type=positive_int, default=2, help="proposal faults per image")
    m.add_argument("--check", type=positive_int, default=600, help="held-out pool images for the check")
    m.add_argument("--max-severity", type=int, default=None, help="default: the config's augment.damage.max_severity")
    m.add_argument("--starts", type=positive_int, default=4, help="optimiser starts (the config's mix, then jittered)")
    m.add_argument("--steps", type=positive_int, default=300, help="Adam steps per start")
    m.add_argument("--workers", type=positive_int, default=2, help="threads computing damage features")
    m.add_argument("--seed", type=int, default=0)

    def run_match(args):
        from .match import damage_match

        damage_match(config_from_args(args), args.target, args.images, args.per_image, args.check,
                     args.max_severity, args.starts, args.steps, args.workers, args.seed)

    m.set_defaults(func=run_match)
