"""Pseudo-labelled rows as extra training rows (`data.pseudo_labels`, the `train_rows` hook point): the file that
`make pseudo-label` writes, each row located in the holdout or test images."""
from __future__ import annotations

import pandas as pd

from ...core.console import console
from ...core.errors import WBCError, where
from ...s3_train.inputs import Chain, ExtraRows, Rows, read_id_file


def read_pseudo(path, classes: list[str], pool: pd.DataFrame, holdout: pd.DataFrame,
                test: pd.DataFrame) -> pd.DataFrame:
    """ID, labels, source ("holdout" / "test") and index into that split, grouped by source."""
    path, df = read_id_file(path, "data.pseudo_labels", ("ID", "labels"))
    if not len(df):
        raise WBCError(f"{path}: no pseudo-labelled rows")
    in_pool = set(pool["ID"])
    where_id = {**{i: ("holdout", k) for k, i in enumerate(holdout["ID"])},
                **{i: ("test", k) for k, i in enumerate(test["ID"])}}
    seen, src, idx = set(), [], []
    for k, (i, lbl) in enumerate(zip(df["ID"], df["labels"])):
        at = where(path, k + 2)
        if i in seen:
            raise WBCError(f"{at}: duplicate ID {i}")
        if lbl not in classes:
            raise WBCError(f"{at}: unknown label '{lbl}' (classes: {', '.join(classes)})")
        if i in in_pool:
            raise WBCError(f"{at}: ID {i} is in the labelled training pool; pseudo-labels are for unlabelled splits")
        if i not in where_id:
            raise WBCError(f"{at}: ID {i} is in neither the holdout nor the test split")
        seen.add(i)
        src.append(where_id[i][0])
        idx.append(where_id[i][1])
    out = pd.DataFrame({"ID": df["ID"], "labels": df["labels"], "source": src, "index": idx})
    return out.sort_values("source", kind="stable", ignore_index=True)  # grouped as the rows are chained


def load(cfg: dict, all_classes: list[str], classes: list[str], pool: pd.DataFrame, holdout: tuple,
         test: tuple) -> ExtraRows:
    """The pseudo-labelled rows (a specialist keeps those of its own classes). `holdout` and `test` are (rows,
    images) of those splits."""
    rows = read_pseudo(cfg["data"]["pseudo_labels"], all_classes, pool, holdout[0], test[0])
    if len(classes) < len(all_classes):
        rows = rows[rows["labels"].isin(classes)].reset_index(drop=True)
    arrays = {"holdout": holdout[1], "test": test[1]}
    parts = [Rows(arrays[src], g["index"].to_numpy()) for src, g in rows.groupby("source")]
    note = f"{len(rows)} pseudo-labelled"
    if (rows["source"] == "holdout").any():
        console.print("[yellow]warning:[/] pseudo-labels include holdout images: their scores are transductive")
    return ExtraRows(Chain(parts), rows["labels"].to_numpy(), rows["ID"].to_numpy(), note)
