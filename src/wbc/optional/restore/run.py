"""`train-restorer` (gate + Pix2Pix + held-out evaluation + QA sheet) and `restore` (restored copies of a split).

    <out_dir>/  config.yaml gate.json generator.pt state.pt metrics.jsonl eval.json qa.png
    <restored_dir>/<dataset>/<split>/<ID>   restored (or, where the gate says clean, unchanged) images
    <restored_dir>/<dataset>/<split>/restored.csv   ID,damage_score,restored
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from ...core.config import CONFIG_DIR, dataset_name, deep_merge, dump_config, resolve_path
from ...core.console import console, print_table, progress
from ...core.errors import WBCError
from ...core.io import atomic_path, write_csv, write_json, write_text
from ...core.runtime import resolve_device
from ...s1_data.cache import decode_all, read_image
from ...s1_data.damage import damage
from ...s1_data.layout import data_root, read_split, read_splits
from .pairs import simulate
from .pix2pix import Restorer, psnr, train_pix2pix
from .qa import qa_sheet
from .score import Gate

SEVERITIES = (1, 2, 3)


def restorer_config(cfg: dict) -> dict:
    """The config's `restorer` section over the defaults in configs/restorer.yaml."""
    defaults = yaml.safe_load((CONFIG_DIR / "steps" / "restorer.yaml").read_text())["restorer"]
    rc = deep_merge(defaults, cfg.get("restorer") or {})
    rc["image_size"] = int(rc.get("image_size") or cfg["data"]["image_size"])
    if rc.get("crop") and int(rc["crop"]) % 32:
        raise WBCError(f"restorer.crop must be a multiple of 32, got {rc['crop']}")
    return rc


def out_dir(cfg: dict, rc: dict) -> Path:
    return resolve_path(rc.get("out_dir") or cfg["data"]["restore_dir"])


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def _quality(images: np.ndarray, clean: np.ndarray) -> dict:
    return {"psnr": float(np.mean([psnr(a, b) for a, b in zip(images, clean)])),
            "ssim": float(np.mean([_ssim(a, b) for a, b in zip(images, clean)]))}


def evaluate(restorer: Restorer, clean: np.ndarray, seed: int) -> dict:
    """PSNR/SSIM to the clean image of damaged, restored (every image) and gated (the pipeline's output)
    held-out pairs per severity; severity 0 shows what the restorer does to clean images."""
    out = {}
    for sev in (0,) + SEVERITIES:
        dmg = simulate(clean, sev, seed)
        gated, _, mask = restorer(dmg)
        out[str(sev)] = {"n": len(clean), "damaged": _quality(dmg, clean),
                         "restored": _quality(restorer.restore(dmg), clean), "gated": _quality(gated, clean),
                         "gate_restored_fraction": float(mask.mean())}
    return out


def train_restorer(cfg: dict) -> dict:
    rc = restorer_config(cfg)
    cfg = {**cfg, "restorer": rc}
    root, run_dir, seed = data_root(cfg), out_dir(cfg, rc), int(cfg.get("seed", 0))
    device = resolve_device(str(cfg.get("device", "auto")))
    size = rc["image_size"]
    clean_df = read_splits(root, rc["clean_splits"])
    clean = decode_all(clean_df, size, desc="decode clean")
    need = int(rc["holdout"]) + 2
    if len(clean) < need:
        raise WBCError(f"{root}: {len(clean)} clean images in {', '.join(rc['clean_splits'])}; the restorer needs "
                       f"at least {need} (restorer.holdout={rc['holdout']} plus training images)")
    order = np.random.default_rng(seed).permutation(len(clean))
    hold, pool = order[:int(rc["holdout"])], order[int(rc["holdout"]):]

    # Gate: clean pool images against their simulated damage at random severities.
    rng = np.random.default_rng(seed + 1)
    gate_idx = pool[:int(rc["gate_images"])]
    dmg = np.stack([damage(clean[i], int(rng.integers(1, 4)), rng) for i in gate_idx])
    gate = Gate.fit(clean[gate_idx], dmg)
    gate.save(run_dir / "gate.json")
    train = [clean[pool]]
    gated_counts = {}
    for split in rc["gated_splits"]:
        df = read_split(root, split)
        imgs = decode_all(df, size, desc=f"decode {split}")
        _, damaged = gate(imgs)
        train.append(imgs[~damaged])
        gated_counts[split] = {"n": len(imgs), "clean": int((~damaged).sum())}
    train = np.concatenate(train)
    write_text(run_dir / "config.yaml", dump_config(cfg))
    st = gate.stats
    print_table("damage gate (held-in clean vs simulated damage)", ["threshold", "clean pass", "damaged caught",
                "balanced acc"], [[gate.threshold, st["clean_pass_rate"], st["damaged_detect_rate"],
                                   st["balanced_accuracy"]]])
    console.print(f"restorer training images: {len(pool)} from {', '.join(rc['clean_splits'])}"
                  + "".join(f", {c['clean']}/{c['n']} clean-scored from {s}" for s, c in gated_counts.items())
                  + f"; {len(hold)} held out", highlight=False)

    n_val = min(16, len(hold))
    val = (simulate(clean[hold[:n_val]], 2, seed + 2), clean[hold[:n_val]])
    G = train_pix2pix(rc, train, run_dir, device, seed, val=val, resume=bool(rc.get("resume", True)))
    restorer = Restorer(G, gate, device, int(rc["batch_size"]), rc.get("amp", "bf16"), size)
    held = clean[hold]
    result = {"per_severity": evaluate(restorer, held, seed + 3), "gate": {"threshold": gate.threshold, **st},
              "train_images": len(train), "gated_splits": gated_counts}
    write_json(run_dir / "eval.json", result)
    rows = [[sev, r["damaged"]["psnr"], r["restored"]["psnr"], r["gated"]["psnr"], r["damaged"]["ssim"],
             r["restored"]["ssim"], r["gated"]["ssim"], r["gate_restored_fraction"]]
            for sev, r in result["per_severity"].items()]
    print_table(f"held-out simulated pairs (n={len(held)}) vs clean", ["sev", "PSNR dmg", "PSNR rest",
                "PSNR gated", "SSIM dmg", "SSIM rest", "SSIM gated", "to G"], rows, "{:.3f}")

    q = hold[:int(rc["qa_rows"])]
    sevs = [SEVERITIES[i % len(SEVERITIES)] for i in range(len(q))]
    qd = np.stack([simulate(clean[[i]], s, seed + 4)[0] for i, s in zip(q, sevs)])
    qa_sheet(run_dir / "qa.png", qd, restorer.restore(qd), clean[q], [f"sev {s}" for s in sevs])
    console.print(f"restorer written to {run_dir}", highlight=False)
    return result


def _write_image(path: Path, img: np.ndarray) -> None:
    ext = path.suffix.lower() if path.suffix else ".png"
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise WBCError(f"{path}: cannot encode a '{ext}' image")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def _copy(src, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def restore_split(cfg: dict, split: str | None = None) -> pd.DataFrame:
    """Restored copies of one split, keyed by ID; gate-clean images are copied byte for byte."""
    rc = restorer_config(cfg)
    split = split or cfg["data"]["test_split"]
    restorer = Restorer.load(out_dir(cfg, rc), device=str(cfg.get("device", "auto")))
    root = data_root(cfg)
    df = read_split(root, split)
    dest = resolve_path(rc["restored_dir"]) / dataset_name(cfg) / split
    scores, flags = np.zeros(len(df)), np.zeros(len(df), bool)
    bs = restorer.batch_size
    with progress() as bar:
        task = bar.add_task(f"restore {split}", total=len(df), info="")
        for start in range(0, len(df), bs):
            rows = df.iloc[start:start + bs]
            imgs = [read_image(r.path, r.csv, r.row) for r in rows.itertuples()]
            # Images of one shape go through the generator together.
            for shape in {im.shape for im in imgs}:
                idx = [i for i, im in enumerate(imgs) if im.shape == shape]
                out, s, m = restorer(np.stack([imgs[i] for i in idx]))
                for j, i in enumerate(idx):
                    r = rows.iloc[i]
                    scores[start + i], flags[start + i] = s[j], m[j]
                    if m[j]:
                        _write_image(dest / r["ID"], out[j])
                    else:
                        _copy(r["path"], dest / r["ID"])
            bar.advance(task, len(rows))
    res = pd.DataFrame({"ID": df["ID"], "damage_score": scores.round(4), "restored": flags.astype(int)})
    write_csv(dest / "restored.csv", res)
    print_table(f"restore {split}", ["images", "restored", "passed through", "median score", "threshold"],
                [[len(df), int(flags.sum()), int((~flags).sum()), float(np.median(scores)), restorer.gate.threshold]])
    console.print(f"restored copies in {dest}", highlight=False)
    return res
