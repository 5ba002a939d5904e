"""`split-labels`: one combined label file (the competition's `combined_train.csv`: `ID,labels,split,img_dir`, phase1
rows with an empty `split`) written out as the per-split files of the WBCBench layout, which every step reads.

Each row's `split` value names its split through `SPLIT_VALUES` (or `--map`); `img_dir`, when present, stays with the
row, so an image keeps the folder it lives in. Every file is read back through `layout.read_split` (IDs, labels,
img_dir, images) before any of them replaces what the data root held: a bad row is one error line naming the combined
file and its row, and nothing is half-written.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from ..core.errors import WBCError, where
from ..core.io import atomic_path, require_columns
from .layout import SPLITS, read_split, read_table

# a combined file's `split` values -> the layout's splits (case and surrounding spaces ignored)
SPLIT_VALUES = {
    "": "phase1", "phase1": "phase1",
    "train": "phase2_train", "phase2_train": "phase2_train",
    "eval": "phase2_eval", "val": "phase2_eval", "valid": "phase2_eval", "phase2_eval": "phase2_eval",
    "test": "phase2_test", "phase2_test": "phase2_test",
}


def parse_map(items) -> dict:
    """`--map value=split ...` over the defaults (`--map holdout=phase2_eval`)."""
    out = dict(SPLIT_VALUES)
    for item in items or ():
        value, eq, split = item.partition("=")
        if not eq or split not in SPLITS:
            raise WBCError(f"--map {item!r}: expected <value>=<split>, the split one of {', '.join(SPLITS)}")
        out[value.strip().lower()] = split
    return out


def split_label_file(path, root, mapping: dict | None = None, check_images: bool = True) -> dict:
    """Write `root/<split file>` for every split the combined file `path` holds; returns {split: rows}."""
    path, root = Path(path), Path(root)
    mapping = mapping or SPLIT_VALUES
    df = read_table(path)
    require_columns(df, path, ("ID", "labels", "split"))
    value = df["split"].str.strip().str.lower()
    unknown = ~value.isin(list(mapping))
    if unknown.any():
        i = int(unknown.to_numpy().nonzero()[0][0])
        raise WBCError(f"{where(path, i + 2)}: split {df['split'].iloc[i]!r} is none of "
                       f"{', '.join(repr(v) for v in sorted(mapping))} (add --map {df['split'].iloc[i]}=<split>)")
    df = df.assign(split=value.map(mapping))
    splits = sorted(set(df["split"]), key=list(SPLITS).index)
    with contextlib.ExitStack() as stack:  # renamed into place together, only when every one was checked
        tmp = {s: stack.enter_context(atomic_path(root / SPLITS[s][0])) for s in splits}
        for s in splits:
            rows = df[df["split"] == s]
            rows.drop(columns="split").to_csv(tmp[s], index=False)
            try:
                read_split(root, s, check_images, csv=tmp[s])
            except WBCError as e:  # name the combined file's row, not the temporary file's
                raise WBCError(_in_combined(str(e), tmp[s], path, rows.index)) from None
    return {s: int((df["split"] == s).sum()) for s in splits}


def _in_combined(msg: str, tmp: Path, path: Path, index) -> str:
    """`<tmp>:<row>: ...` -> `<combined file>:<its row>: ...`."""
    prefix = f"{tmp}:"
    if not msg.startswith(prefix):
        return msg.replace(str(tmp), str(path))
    row, _, rest = msg[len(prefix):].partition(":")
    if not row.isdigit() or int(row) < 2:
        return msg.replace(str(tmp), str(path))
    return f"{where(path, int(index[int(row) - 2]) + 2)}:{rest}"
