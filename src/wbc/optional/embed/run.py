"""`embed` and `fewshot` steps: per-fold embeddings, classifiers on them, few-shot tables.

Outputs of `embed` (run name = config stem or `name=`):
    outputs/<name>/fold<k>/embeddings_{train,eval,test}.npz   fold-k encoder; `train` holds the whole CV
        pool with its `folds`, so rows with fold == k are out-of-fold
    outputs/<name>/embeddings_{train,eval,test}.npz           instead, when one encoder serves every fold
        (a frozen / untrained backbone and no head)
    outputs/<name>/fold<k>/{embed.pt,metrics.jsonl}           head training (embed.epochs > 0)
    outputs/<name>_<clf>/[fold<k>/]{oof,eval,test}.csv         probabilities of each classifier, fitted per
        fold on fold-k training embeddings only, in the fold models' format (ensemble members)
    outputs/<name>/report.json
Each .npz holds `ids`, float32 `embeddings` (L2-normalised), `labels` ('' unknown), `groups` ('' none) and,
for train, `folds`.
"""
from __future__ import annotations

import copy
import math
import zipfile
from pathlib import Path

import numpy as np

from ...core.config import deep_merge, dump_config, unknown_keys
from ...core.console import console, print_table
from ...core.errors import WBCError, first_line
from ...core.io import Probs, atomic_path, save_probs, write_json, write_text
from ...core.metrics import macro_f1
from ...core.run_folder import fold_dir, fold_index, run_dir
from ...core.validate import type_problems
from .classifiers import CLASSIFIERS, build_classifier, l2norm

DEFAULTS = {
    "encoder": "timm",            # timm (model.*) | run (fold models of init_from_run) | medsiglip
    "init_from_run": None,        # run name under output_dir: fold k starts from <run>/fold<k>/<predict.weights>.pt
    "medsiglip_dir": "weights/medsiglip-448",
    "freeze_backbone": False,     # medsiglip is always frozen
    "epochs": 10,                 # 0: no head, export the backbone's pooled features
    "loss": "siglip",             # siglip | supcon
    "siglip": {"pairwise": True, "class_embeddings": True, "t_init": math.log(10.0), "b_init": -10.0},
    "supcon_temperature": 0.1,
    "ce_weight": 0.0,             # > 0: joint classification (CE on a linear head over the backbone features)
    "proj_dim": 128,
    "hidden_dim": 512,            # 0: linear projection
    "classes_per_batch": 16,
    "samples_per_class": 4,
    "steps_per_epoch": None,      # default: pool size / batch size
    "lr": 1.0e-3,
    "backbone_lr": 1.0e-4,
    "weight_decay": 1.0e-4,
    "grad_clip": 1.0,
    "num_workers": 4,
    "batch_size": 128,            # export
    "tta": 1,                     # dihedral views averaged per exported embedding
    "classifiers": ["proto", "knn", "logreg"],
    "knn_k": 10,
    "knn_temperature": 0.07,
    "proto_temperature": 10.0,
    "proto_per_class_temperature": True,
    "linear_C": 1.0,
    "mlp_hidden": 256,
    "hierarchy": ["PMY", "MY", "MMY", "BNE", "SNE"],  # hier: the group decided first as one class, then its stages
    "fewshot": {"ks": [1, 5, 10, 50], "episodes": 600, "n_query": 15, "n_way": None,
                "labels_per_class": 50, "repeats": 5, "classifier": "logreg"},
}
SPLITS = ("train", "eval", "test")


def with_defaults(cfg: dict) -> dict:
    if not cfg.get("embed"):  # else a fold model's config would write into that model's run folder
        raise WBCError(f"config '{cfg.get('name')}' has no embed: section (use configs/embed_*.yaml)")
    unknown = unknown_keys(cfg["embed"], DEFAULTS, "embed.")  # a typo such as embed.epoch
    if unknown:
        raise WBCError(f"{unknown[0]}: unknown key (optional/embed/run.py DEFAULTS lists every embed key)")
    wrong = type_problems(cfg["embed"], DEFAULTS, "embed.")  # embed.epochs=abc
    if wrong:
        raise WBCError(wrong[0])
    cfg = copy.deepcopy(cfg)
    cfg["embed"] = deep_merge(DEFAULTS, cfg["embed"])
    e = cfg["embed"]
    bad = [c for c in e["classifiers"] if c not in CLASSIFIERS]
    if bad:
        raise WBCError(f"embed.classifiers: unknown '{bad[0]}' (known: {', '.join(CLASSIFIERS)})")
    if e["encoder"] not in ("timm", "run", "medsiglip"):
        raise WBCError(f"embed.encoder: unknown encoder '{e['encoder']}' (timm | run | medsiglip)")
    return cfg


def save_embeddings(path: Path, ids, emb, labels, groups, folds=None) -> None:
    arrays = {"ids": np.asarray(ids).astype(str), "embeddings": np.asarray(emb, np.float32),
              "labels": np.asarray(labels).astype(str), "groups": np.asarray(groups).astype(str)}
    if folds is not None:
        arrays["folds"] = np.asarray(folds, dtype=int)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_embeddings(run: Path, split: str, fold: int | None = None) -> dict:
    """`split` embeddings of a run: the fold's own file, else the one shared by every fold."""
    cands = ([fold_dir(run, fold) / f"embeddings_{split}.npz"] if fold is not None else []) + \
        [run / f"embeddings_{split}.npz"]
    for p in cands:
        if p.is_file():
            try:
                with np.load(p) as z:
                    return {k: z[k] for k in z.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a killed copy, a full disk
                raise WBCError(f"{p}: unreadable embeddings ({first_line(e)[:160]}): run `make embed` again") from None
    raise WBCError(f"{cands[0]}: embeddings not found (run `make embed` with this config first)")


def _groups(df) -> np.ndarray:
    from ...s1_data.layout import group_column

    g = group_column(df)
    return df[g].astype(str).to_numpy() if g else np.full(len(df), "")


def run_embed(cfg: dict, resume: bool = False) -> dict:
    import torch

    from ...core.runtime import device_precision, pick_device, seed_everything
    from ...s1_data.augment import build_transform
    from ...s3_train.inputs import Rows, load_fold_data
    from .encoders import EmbeddingHead, EmbeddingModel, build_encoder
    from .losses import build_loss
    from .train import embed_array, train_embedding

    cfg = with_defaults(cfg)
    e = cfg["embed"]
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)
    device = pick_device(cfg)
    amp = device_precision(cfg["train"], device)["amp"]

    frozen = e["encoder"] == "medsiglip" or bool(e["freeze_backbone"])
    epochs = int(e["epochs"])
    train_backbone = not frozen and epochs > 0
    shared = e["encoder"] != "run" and not train_backbone  # one backbone forward serves every fold
    shared_enc = build_encoder(cfg) if shared else None  # before the data: a missing encoder fails fast
    data = load_fold_data(cfg)
    out = run_dir(cfg)
    write_text(out / "config.yaml", dump_config(cfg))
    classes, n_cls = data.classes, len(data.classes)
    lut = {c: i for i, c in enumerate(classes)}
    pool_fold = data.pool["fold"].to_numpy()
    y_pool = data.pool["labels"].map(lut).to_numpy()
    frames = {"train": data.pool, "eval": data.holdout, "test": data.test}
    images = {"train": data.pool_images, "eval": data.holdout_images, "test": data.test_images}
    present = [s for s in SPLITS if images[s] is not None and len(frames[s])]
    folds = sorted(set(pool_fold.tolist()))

    kw = dict(device=device, batch_size=int(e["batch_size"]), amp=amp)

    def features(enc):
        enc.to(device).eval()
        norm = {"mean": enc.mean, "std": enc.std}
        return {s: embed_array(enc, images[s], norm=norm, tta=int(e["tta"]), desc=f"features {s}", **kw)
                for s in present}

    def write(where: Path, emb: dict):
        for s in present:
            f = frames[s]
            save_embeddings(where / f"embeddings_{s}.npz", f["ID"], emb[s], f["labels"], _groups(f),
                            pool_fold if s == "train" else None)

    # Embeddings of an earlier run in the other layout would be read instead of these; remove them.
    for f in out.glob("fold*/embeddings_*.npz" if shared and epochs == 0 else "embeddings_*.npz"):
        f.unlink()
    shared_feats = features(shared_enc) if shared else None
    if shared and epochs == 0:
        shared_emb = {s: l2norm(v) for s, v in shared_feats.items()}
        write(out, shared_emb)
    clf_parts: dict[str, dict[int, dict]] = {c: {} for c in e["classifiers"]}
    histories = {}
    for k in folds:
        fdir = fold_dir(out, k)
        tr = np.flatnonzero(pool_fold != k)
        torch.manual_seed(seed + k)
        if shared and epochs == 0:
            emb = shared_emb
        elif train_backbone:
            enc = build_encoder(cfg, k)
            model = EmbeddingModel(enc, EmbeddingHead(enc.feat_dim, int(e["proj_dim"]), int(e["hidden_dim"]),
                                                      n_cls if float(e["ce_weight"]) > 0 else 0))
            norm = {"mean": enc.mean, "std": enc.std}
            loss_fn = build_loss(e, int(e["proj_dim"]), n_cls)
            histories[k] = train_embedding(model, loss_fn, Rows(images["train"], tr), y_pool[tr], e, device, fdir,
                                           seed + k, build_transform(cfg, train=True), norm, amp, f"fold {k}", resume)
            emb = {s: embed_array(model, images[s], norm=norm, tta=int(e["tta"]), desc=f"embed {s}", **kw)
                   for s in present}
            write(fdir, emb)
        else:
            feats = shared_feats or features(build_encoder(cfg, k))
            if epochs == 0:
                emb = {s: l2norm(v) for s, v in feats.items()}
            else:
                dim = feats["train"].shape[1]
                model = EmbeddingModel(None, EmbeddingHead(dim, int(e["proj_dim"]), int(e["hidden_dim"]),
                                                           n_cls if float(e["ce_weight"]) > 0 else 0))
                loss_fn = build_loss(e, int(e["proj_dim"]), n_cls)
                histories[k] = train_embedding(model, loss_fn, feats["train"][tr], y_pool[tr], e, device, fdir,
                                               seed + k, desc=f"fold {k} head", resume=resume)
                emb = {s: embed_array(model, feats[s], desc=f"embed {s}", **kw) for s in present}
            write(fdir, emb)
        for name in e["classifiers"]:
            clf = build_classifier(name, n_cls, e, seed + k, classes).fit(emb["train"][tr], y_pool[tr])
            clf_parts[name][k] = {s: clf.predict_proba(emb[s] if s != "train" else emb[s][pool_fold == k])
                                  for s in present}
    report = {"name": cfg["name"], "encoder": e["encoder"], "loss": e["loss"] if epochs else None,
              "epochs": epochs, "dim": int(emb["train"].shape[1]), "folds": folds, "classifiers": {}}
    if histories:
        report["final_loss"] = {int(k): h[-1]["loss"] for k, h in histories.items() if h}
    for name, parts in clf_parts.items():
        report["classifiers"][name] = write_classifier_run(cfg, name, parts, frames, present, classes, pool_fold)
    write_json(out / "report.json", report)
    rows = [[n, Path(r["dir"]).name, r["oof_macro_f1"], r.get("eval_macro_f1", float("nan"))]
            for n, r in report["classifiers"].items()]
    print_table(f"{cfg['name']}: classifiers on embeddings", ["classifier", "run", "OOF macro-F1", "eval macro-F1"],
                rows)
    return report


def write_classifier_run(cfg: dict, name: str, parts: dict[int, dict], frames: dict, present: list[str],
                         classes: list[str], pool_fold: np.ndarray) -> dict:
    """outputs/<embed>_<clf>/fold<k>/{oof,eval,test}.csv, merged like a fold model's run."""
    from ...s4_predict.merge import merge_run

    ccfg = copy.deepcopy(cfg)
    ccfg["name"] = f"{cfg['name']}_{name}"
    cdir = run_dir(ccfg)
    write_text(cdir / "config.yaml", dump_config(ccfg))
    for f in cdir.glob("fold*/*.csv"):  # folds of an earlier split would be merged in
        if fold_index(f.parent) is not None and fold_index(f.parent) not in parts:
            f.unlink()
    pool = frames["train"]
    for k, probs in parts.items():
        held = pool_fold == k
        save_probs(fold_dir(cdir, k) / "oof.csv", Probs(pool["ID"].to_numpy()[held], probs["train"], classes,
                                                         pool_fold[held], pool["labels"].to_numpy()[held]))
        for s in ("eval", "test"):
            if s in present:
                save_probs(fold_dir(cdir, k) / f"{s}.csv",
                           Probs(frames[s]["ID"].to_numpy(), probs[s], classes, labels=frames[s]["labels"].to_numpy()))
    rep = merge_run(cdir, expected_ids=pool["ID"].tolist())
    out = {"dir": str(cdir), "oof_macro_f1": rep["oof"]["macro_f1"], "oof_accuracy": rep["oof"]["accuracy"]}
    if "eval" in rep:
        out.update(eval_macro_f1=rep["eval"]["macro_f1"], eval_accuracy=rep["eval"]["accuracy"])
    return out


def fewshot_spaces(run: Path, folds: list[int], lut: dict) -> tuple[list[dict], bool]:
    """Labelled embedding sets that episodes may draw from, and whether one encoder serves every fold.

    Shared embeddings: the whole pool plus eval. Per-fold encoders: fold k's held-out images plus eval,
    all embedded by encoder k (never by an encoder trained on them)."""
    shared = (run / "embeddings_train.npz").is_file()
    spaces = []
    for k in ([None] if shared else folds):
        tr = load_embeddings(run, "train", k)
        keep = np.ones(len(tr["ids"]), bool) if k is None else tr["folds"] == k
        parts = [{key: tr[key][keep] for key in ("ids", "embeddings", "labels", "groups")}]
        try:
            parts.append(load_embeddings(run, "eval", k))
        except WBCError:
            pass
        emb = np.concatenate([p["embeddings"] for p in parts])
        labels = np.concatenate([p["labels"] for p in parts])
        ids = np.concatenate([p["ids"] for p in parts]).astype(object)
        groups = np.concatenate([p["groups"] for p in parts]).astype(object)
        groups = np.where(groups == "", "ID:" + ids, groups)  # an image without a group is its own group
        ok = np.isin(labels, list(lut))
        spaces.append({"emb": emb[ok], "y": np.array([lut[c] for c in labels[ok]]), "groups": groups[ok]})
    return spaces, shared


def labels_per_class(run: Path, folds: list[int], lut: dict, classes: list[str], e: dict, seed: int) -> dict:
    """Fit the lightweight classifier on at most L labels per class of each fold's training part; score the
    held-out folds (OOF) and eval (fold mean). Repeated with fresh draws; mean and 95% interval."""
    from .fewshot import mean_ci, subsample_per_class

    fs = e["fewshot"]
    n_cls = len(classes)
    oof_f1, eval_f1 = [], []
    for r in range(int(fs["repeats"])):
        rng = np.random.default_rng([seed, r])
        yt_all, yp_all, ev = [], [], []
        for k in folds:
            tr = load_embeddings(run, "train", k)
            y = np.array([lut.get(c, -1) for c in tr["labels"]])
            idx = np.flatnonzero((tr["folds"] != k) & (y >= 0))
            pick = idx[subsample_per_class(y[idx], int(fs["labels_per_class"]), rng)]
            clf = build_classifier(fs["classifier"], n_cls, e, seed + r, classes).fit(tr["embeddings"][pick], y[pick])
            held = np.flatnonzero((tr["folds"] == k) & (y >= 0))
            yt_all.append(y[held])
            yp_all.append(clf.predict_proba(tr["embeddings"][held]).argmax(1))
            try:
                evd = load_embeddings(run, "eval", k)
                ev.append((evd, clf.predict_proba(evd["embeddings"])))
            except WBCError:
                pass
        oof_f1.append(macro_f1(np.concatenate(yt_all), np.concatenate(yp_all), n_cls))
        if ev:
            ye = np.array([lut.get(c, -1) for c in ev[0][0]["labels"]])
            lab = ye >= 0  # an unlabelled eval row would count as one more class
            eval_f1.append(macro_f1(ye[lab], np.mean([p for _, p in ev], 0)[lab].argmax(1), n_cls))
    out = {"labels_per_class": int(fs["labels_per_class"]), "classifier": fs["classifier"],
           "repeats": int(fs["repeats"])}
    out["oof_macro_f1"], out["oof_macro_f1_ci95"] = mean_ci(oof_f1)
    if eval_f1:
        out["eval_macro_f1"], out["eval_macro_f1_ci95"] = mean_ci(eval_f1)
    return out


def run_fewshot(cfg: dict) -> dict:
    from ...s1_data.layout import class_list
    from .fewshot import run_episodes

    cfg = with_defaults(cfg)
    e, fs = cfg["embed"], cfg["embed"]["fewshot"]
    seed = int(cfg.get("seed", 0))
    run = run_dir(cfg)
    classes = class_list(cfg)
    lut = {c: i for i, c in enumerate(classes)}
    tr = load_embeddings(run, "train", 0)
    folds = sorted(set(tr["folds"].tolist()))
    spaces, shared = fewshot_spaces(run, folds, lut)
    rows = run_episodes(spaces, fs["ks"], int(fs["episodes"]), int(fs["n_query"]), seed, fs.get("n_way"))
    lpc = labels_per_class(run, folds, lut, classes, e, seed)
    report = {"name": cfg["name"], "shared_encoder": shared, "episodes": rows, "labels_per_class": lpc}
    write_json(run / "fewshot.json", report)
    print_table(f"{cfg['name']}: N-way K-shot episodes (prototype readout, {fs['n_query']} queries per class)",
                ["K", "episodes", "N-way", "accuracy", "±95%", "macro-F1", "±95%"],
                [[r["k_shot"], r["episodes"], f"{r['n_way']:.1f}", r["accuracy"], r["accuracy_ci95"], r["macro_f1"],
                  r["macro_f1_ci95"]] for r in rows])
    print_table(f"{cfg['name']}: {lpc['classifier']} on {lpc['labels_per_class']} labels per class "
                f"({lpc['repeats']} draws)", ["split", "macro-F1", "±95%"],
                [["OOF", lpc["oof_macro_f1"], lpc["oof_macro_f1_ci95"]]] +
                ([["eval", lpc["eval_macro_f1"], lpc["eval_macro_f1_ci95"]]] if "eval_macro_f1" in lpc else []))
    skipped = [r["k_shot"] for r in rows if r["episodes"] == 0]
    if skipped:
        console.print(f"[yellow]no class has enough images for K = {skipped}[/]", highlight=False)
    return report
