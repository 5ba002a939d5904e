"""`select-ssl`: prototype-guided, density-aware choice of the images to pretrain on (after ActiveSSF, Zhuang et al.
2025, arXiv 2502.08200), so that the rare subtypes weigh more in self-supervised pretraining.

1. Embed every image of the ssl image set with the current encoder (`model.*`: ImageNet weights, or an earlier
   `pretrain-ssl` backbone), through the same cell filter as pretraining.
2. Labelled set: at most `select.labels_per_class` pool images per class (a seeded draw; null: every pool label).
   Prototypes: K-means per class on their embeddings, ceil(n_c / images_per_prototype) clusters, at most
   `max_prototypes`; each prototype is its cluster's normalised mean.
3. Each prototype's base threshold is the `quantile` of its own members' cosine similarities to it (a tight cluster
   asks for more), its spread their standard deviation (a cluster of one takes the median spread). The density of a
   prototype is the number of unlabelled candidates whose nearest prototype it is, relative to the densest one; its
   threshold widens as it gets sparser, in units of its own spread (so `widen` means the same for any encoder's
   similarity scale): tau = base - widen * spread * (1 - density).
4. A candidate is kept when its similarity to its nearest prototype reaches that prototype's threshold. Common
   subtypes, dense regions, keep only their closest candidates; rare ones keep nearly all theirs.

Outputs in `<output_dir>/<name>_select/`: `selected.csv` (ID, split, source = labelled | selected, class, prototype,
similarity, threshold; the labelled images and the kept candidates: `ssl.image_list` takes it), `selection.json`
(every prototype and class: members, density, threshold, candidates, kept), config.yaml.
The selection reads pool labels: with `images: pool`, a fold estimate on features pretrained on the selection has seen
which images were picked by labels of its held-out fold (never the labels themselves).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ...core.config import display_path, dump_config
from ...core.console import console, print_table
from ...core.io import write_csv, write_json, write_text
from ...core.run_folder import run_dir
from .settings import ssl_section


@dataclass
class Prototypes:
    vectors: np.ndarray  # (P, D), unit length
    classes: np.ndarray  # (P,) class code of each prototype
    names: np.ndarray  # (P,) "<class>/<k>"
    members: np.ndarray  # (P,) labelled images in its cluster
    base: np.ndarray  # (P,) base threshold: the quantile of its members' similarities
    spread: np.ndarray  # (P,) the standard deviation of its members' similarities


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def build_prototypes(emb: np.ndarray, labels: np.ndarray, sel: dict, seed: int) -> Prototypes:
    """K-means prototypes of every class in `labels`, with their base thresholds."""
    from sklearn.cluster import KMeans

    z = unit(emb)
    vecs, classes, names, members, base, spread = [], [], [], [], [], []
    for c in sorted(set(labels.tolist())):
        x = z[labels == c]
        k = min(int(sel["max_prototypes"]), math.ceil(len(x) / int(sel["images_per_prototype"])), len(x))
        assign = np.zeros(len(x), int) if k == 1 else \
            KMeans(k, n_init=10, random_state=seed).fit(x).labels_
        for j in range(k):
            part = x[assign == j]
            v = unit(part.mean(0))
            vecs.append(v)
            classes.append(c)
            names.append(f"{c}/{j}")
            members.append(len(part))
            base.append(float(np.quantile(part @ v, float(sel["quantile"]))))
            spread.append(float((part @ v).std()) if len(part) > 1 else np.nan)
    spread = np.array(spread)
    spread[np.isnan(spread)] = np.nanmedian(spread) if (~np.isnan(spread)).any() else 0.0
    return Prototypes(np.stack(vecs), np.array(classes), np.array(names), np.array(members), np.array(base), spread)


def nearest(emb: np.ndarray, protos: Prototypes) -> tuple[np.ndarray, np.ndarray]:
    """Index of each row's most similar prototype and that cosine similarity."""
    sim = unit(emb) @ protos.vectors.T
    idx = sim.argmax(1)
    return idx, sim[np.arange(len(idx)), idx]


def thresholds(protos: Prototypes, near: np.ndarray, widen: float) -> tuple[np.ndarray, np.ndarray]:
    """(density, threshold) of every prototype: density = its candidates / the densest prototype's."""
    counts = np.bincount(near, minlength=len(protos.names)).astype(float)
    density = counts / max(counts.max(), 1.0)
    return density, protos.base - float(widen) * protos.spread * (1.0 - density)


def select(emb: np.ndarray, protos: Prototypes, widen: float) -> dict:
    """The candidates' nearest prototype, similarity, its threshold and whether they are kept."""
    near, sim = nearest(emb, protos)
    density, tau = thresholds(protos, near, widen)
    return {"nearest": near, "similarity": sim, "threshold": tau[near], "keep": sim >= tau[near],
            "density": density, "tau": tau}


def labelled_rows(frame: pd.DataFrame, train_splits, per_class, seed: int) -> np.ndarray:
    """Row indices of the labelled set: pool rows, at most `per_class` of each class (seeded; None: all)."""
    from ..embed.fewshot import subsample_per_class

    pool = np.flatnonzero(frame["split"].isin(list(train_splits)).to_numpy() & (frame["labels"] != "").to_numpy())
    if per_class is None:
        return pool
    y = pd.factorize(frame["labels"].to_numpy()[pool])[0]
    return pool[subsample_per_class(y, int(per_class), np.random.default_rng(seed))]


def embed_images(cfg: dict, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Pooled features of the current encoder (`model.*`) at the cached size."""
    from ...core.runtime import pick_device
    from ..embed.encoders import timm_encoder
    from ..embed.train import embed_array

    device = pick_device(cfg)
    enc = timm_encoder(cfg["model"]).to(device).eval()
    return embed_array(enc, images, device, norm={"mean": enc.mean, "std": enc.std}, batch_size=batch_size,
                       desc="embed for selection")


def run_select(cfg: dict) -> dict:
    from .images import filter_cells, image_frame, load_frame_images

    s = ssl_section(cfg, need=("select",))
    sel = s["select"]
    seed = int(cfg.get("seed", 0))
    frame = image_frame(cfg, {**s, "image_list": None})  # every image the ssl image set offers is a candidate
    images = load_frame_images(cfg, frame)
    if s["cell_filter"] != "none":  # prototypes and candidates as pretraining will see them
        images, _ = filter_cells(images, s["cell_filter"], float(s["cell_margin"]))
    emb = embed_images(cfg, images, int(sel["batch_size"]))
    lab = labelled_rows(frame, cfg["data"]["train_splits"], sel["labels_per_class"], seed)
    protos = build_prototypes(emb[lab], frame["labels"].to_numpy()[lab], sel, seed)
    cand = np.setdiff1d(np.arange(len(frame)), lab)
    res = select(emb[cand], protos, float(sel["widen"]))
    rows = selection_rows(frame, lab, cand, emb, protos, res)
    out_cfg = copy.deepcopy(cfg)
    out_cfg["name"] = f"{cfg['name']}_select"
    out = run_dir(out_cfg)
    write_text(out / "config.yaml", dump_config(out_cfg))
    write_csv(out / "selected.csv", rows)
    summary = summarise(protos, res, frame["split"].to_numpy()[cand], len(lab))
    write_json(out / "selection.json", summary)
    print_table(f"{cfg['name']}: prototype-guided selection ({len(lab)} labelled, {len(cand)} candidates)",
                ["class", "prototypes", "threshold (min)", "candidates", "kept", "kept %"],
                [[c, d["prototypes"], d["min_threshold"], d["candidates"], d["kept"],
                  f"{100 * d['kept'] / max(d['candidates'], 1):.0f}"] for c, d in summary["classes"].items()])
    console.print(f"{len(rows)} images -> {display_path(out / 'selected.csv')} (for ssl.image_list)", highlight=False)
    return summary


def selection_rows(frame: pd.DataFrame, lab: np.ndarray, cand: np.ndarray, emb: np.ndarray, protos: Prototypes,
                   res: dict) -> pd.DataFrame:
    """The labelled images (matched to their own class's nearest prototype) and the kept candidates, in frame
    order, keyed by ID."""
    own = unit(emb[lab]) @ protos.vectors.T
    own[protos.classes[None, :] != frame["labels"].to_numpy()[lab][:, None]] = -np.inf
    lab_near = own.argmax(1)
    keep = cand[res["keep"]]
    near = np.concatenate([lab_near, res["nearest"][res["keep"]]])
    sim = np.concatenate([own[np.arange(len(lab)), lab_near], res["similarity"][res["keep"]]])
    idx = np.concatenate([lab, keep])
    out = pd.DataFrame({"ID": frame["ID"].to_numpy()[idx], "split": frame["split"].to_numpy()[idx],
                        "source": ["labelled"] * len(lab) + ["selected"] * len(keep),
                        "class": protos.classes[near], "prototype": protos.names[near],
                        "similarity": np.round(sim, 6), "threshold": np.round(res["tau"][near], 6)})
    return out.iloc[np.argsort(idx, kind="stable")].reset_index(drop=True)


def summarise(protos: Prototypes, res: dict, cand_splits: np.ndarray, n_labelled: int) -> dict:
    per_proto = {}
    for p, name in enumerate(protos.names):
        mine = res["nearest"] == p
        per_proto[str(name)] = {"class": str(protos.classes[p]), "members": int(protos.members[p]),
                                "base": float(protos.base[p]), "spread": float(protos.spread[p]),
                                "density": float(res["density"][p]),
                                "threshold": float(res["tau"][p]), "candidates": int(mine.sum()),
                                "kept": int((mine & res["keep"]).sum())}
    classes = {}
    for c in sorted(set(protos.classes.tolist())):
        ps = [v for v in per_proto.values() if v["class"] == c]
        classes[c] = {"prototypes": len(ps), "min_threshold": min(v["threshold"] for v in ps),
                      "candidates": sum(v["candidates"] for v in ps), "kept": sum(v["kept"] for v in ps)}
    splits = {str(k): int(v) for k, v in pd.Series(cand_splits[res["keep"]]).value_counts().items()}
    return {"labelled": n_labelled, "candidates": int(len(res["keep"])), "kept": int(res["keep"].sum()),
            "kept_by_split": splits, "classes": classes, "prototypes": per_proto}
