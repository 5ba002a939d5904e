"""`pseudo-label`: confident predictions on unlabelled splits -> a training file for `data.pseudo_labels`."""
from __future__ import annotations


def register(sub) -> None:
    from ...core.cli import add_config_args, config_from_args

    p = add_config_args(sub.add_parser(
        "pseudo-label", help="confident predictions on unlabelled splits as extra training rows (data.pseudo_labels)"))
    p.add_argument("--pred", required=True, help="run / ensemble / refine folder with test.csv (and eval.csv)")
    p.add_argument("--splits", nargs="*", default=None,
                   help="splits to pseudo-label (default: data.test_split); a holdout split's scores turn transductive")
    p.add_argument("--min-confidence", type=float, default=0.7, help="smallest probability of the decided class")
    p.add_argument("--class-fraction", type=float, default=1.0,
                   help="keep at most this fraction of each decided class, most confident first")
    p.add_argument("--out", default=None, help="default: <output_dir>/pseudo/<pred folder>.csv")

    def run(args):
        from .select import pseudo_label

        pseudo_label(config_from_args(args), args.pred, args.splits, args.min_confidence, args.class_fraction,
                     args.out)

    p.set_defaults(func=run)
