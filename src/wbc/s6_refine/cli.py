"""`morph` (morphology features, QA sheet, class separation) and `refine` (rare-class rescue)."""
from __future__ import annotations


def register(sub) -> None:
    from ..core.cli import add_config_args, config_from_args

    default = "configs/steps/refine.yaml"
    m = add_config_args(sub.add_parser("morph", help="segment every image: morphology features, QA sheet, "
                                                     "per-feature class separation"), default=default)
    m.add_argument("--force", action="store_true", help="recompute every image, ignoring the feature cache")

    def run_morph(args):
        from .run import run_morph as run

        cfg = config_from_args(args)
        if args.force:
            cfg.setdefault("morph", {})["force"] = True
        run(cfg)

    m.set_defaults(func=run_morph)

    r = add_config_args(sub.add_parser("refine", help="morphology Gaussians + rare-class rescue rule on top of "
                                                      "ensemble predictions"), default=default)
    r.add_argument("--pred", help="predictions folder (default: refine.predictions)")

    def run_refine(args):
        from .run import run_refine as run

        cfg = config_from_args(args)
        if args.pred:
            cfg.setdefault("refine", {})["predictions"] = args.pred
        run(cfg)

    r.set_defaults(func=run_refine)
