"""`wbc train-restorer` and `wbc restore --split <split>`."""
from __future__ import annotations

from ..cli_common import add_config_args, config_from_args
from ..config import CONFIG_DIR

DEFAULT_CONFIG = str(CONFIG_DIR / "restorer.yaml")


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
