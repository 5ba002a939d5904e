"""Data commands: `python -m wbc sample-data --out data/sample [--seed 0] [--size 96] [--scale 1.0]`."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..core.console import console, print_table
from .layout import LABELLED, read_split


def register(sub) -> None:
    p = sub.add_parser("sample-data", help="write the synthetic WBC-like sample dataset (WBCBench layout)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="data/sample", help="dataset folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every split's image count")
    p.add_argument("--groups", action="store_true", help="add a patient column for grouped folds")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier sample dataset")
    p.set_defaults(func=cmd_sample_data)

    from ..core.cli import add_config_args

    s = add_config_args(sub.add_parser("split-labels", help="one combined label file (ID,labels,split[,img_dir]) "
                                                            "-> the layout's per-split files in the data root"))
    s.add_argument("--labels", required=True, type=Path, help="the combined file, e.g. combined_train.csv")
    s.add_argument("--map", action="append", default=[], metavar="VALUE=SPLIT",
                   help="another split value, e.g. holdout=phase2_eval; repeat for more (known: empty = phase1, "
                        "train, eval / val, test)")
    s.set_defaults(func=cmd_split_labels)


def cmd_split_labels(args: argparse.Namespace) -> None:
    from ..core.cli import config_from_args
    from .combined import parse_map, split_label_file
    from .layout import SPLITS, data_root

    root = data_root(config_from_args(args))
    counts = split_label_file(args.labels, root, parse_map(args.map))
    print_table(f"{args.labels} -> {root}", ["split", "file", "rows"],
                [[s, SPLITS[s][0], n] for s, n in counts.items()])


def cmd_sample_data(args: argparse.Namespace) -> None:
    from .sample import DEFAULT_COUNTS, make_sample_dataset

    counts = {k: max(int(round(v * args.scale)), 1) for k, v in DEFAULT_COUNTS.items()}
    root = make_sample_dataset(Path(args.out), image_size=args.size, seed=args.seed, with_groups=args.groups,
                               overwrite=args.force, **counts)
    print_counts(root)
    console.print(f"wrote {root}")


def print_counts(root: Path) -> None:
    """Per-class image counts of every split, the test column from the hidden answers."""
    import pandas as pd

    frames = {s: read_split(root, s, check_images=False) for s in LABELLED}
    hidden = root / "test_labels_hidden.csv"
    if hidden.exists():
        frames["phase2_test"] = pd.read_csv(hidden, dtype=str, keep_default_na=False)
    classes = sorted(set().union(*(set(f["labels"]) for f in frames.values())) - {""})
    rows = [[c] + [int((f["labels"] == c).sum()) for f in frames.values()] for c in classes]
    rows.append(["total"] + [len(f) for f in frames.values()])
    print_table(f"sample data: {root}", ["class"] + list(frames), rows)
