"""`wbc train-restorer`, `wbc restore --split <split>` and `wbc compare-restore`."""
from __future__ import annotations

from ...core.cli import add_config_args, config_from_args
from ...core.config import CONFIG_DIR

DEFAULT_CONFIG = str(CONFIG_DIR / "steps" / "restorer.yaml")


def _train(args) -> None:
    from .run import train_restorer

    train_restorer(config_from_args(args))


def _restore(args) -> None:
    from .run import restore_split

    restore_split(config_from_args(args), args.split)


def register(sub) -> None:
    p = sub.add_parser("train-restorer", help="fit the damage gate and train the Pix2Pix restorer")
    add_config_args(p, DEFAULT_CONFIG)
    p.set_defaults(func=_train)
    p = sub.add_parser("restore", help="write restored copies of a split, keyed by ID")
    p.add_argument("--split", default=None, help="split to restore (default: data.test_split)")
    add_config_args(p, DEFAULT_CONFIG)
    p.set_defaults(func=_restore)

    p = add_config_args(sub.add_parser(
        "compare-restore",
        help="a run's fold models on a labelled split without vs with the restorer (data.restore_dir)"))
    p.add_argument("--split", default=None, help="labelled split (default: the first of data.holdout_splits)")
    p.add_argument("--severities", type=int, nargs="*", default=[1, 2, 3],
                   help="simulated damage levels applied to the split's gate-clean images")
    p.add_argument("--tta", type=int, default=None, help="dihedral views (default: predict.tta)")

    def compare(args):
        from .compare import compare_restore

        compare_restore(config_from_args(args), args.split, args.severities, tta=args.tta)

    p.set_defaults(func=compare)
