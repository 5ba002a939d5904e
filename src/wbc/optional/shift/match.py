"""Fit the training augmentation's damage mix to a target split's damage (`make damage-match`).

The mix is the damage probability p, the severity weights, each group's chance (blur, lighting, noise) and the
kind weights within a group (`wbc.s1_data.damage`). It is fitted so that the training pool, damaged by it, looks
like the target split in the damage-feature space of `wbc.optional.restore.score` (the space `make shift` weights in).
Everything is measured at the run's input size: images are resized as the cache stores them, then damaged as
the training transform does, so the fit also absorbs what resizing does to noise and blur.

1. Proposals: each of `n_images` pool images gets `per_image` composite faults from a broad proposal (uniform
   severity, each group with chance 1/2, uniform kinds); their features are computed once.
2. Fit: any mix is a re-weighting of the proposals (importance ratio P_mix / P_proposal, self-normalised)
   plus the undamaged images for 1 - p. The energy distance from that weighted sample to the target's
   features is minimised over the mix's logits (torch, Adam, several starts).
3. Check: fresh pool images the fit never saw are damaged through `DamageTransform` itself, by the config's
   mix and by the fitted one, and compared with the target: cross-fitted domain AUC (0.5 = the target cannot
   be told apart) and energy distance.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ...core.config import dataset_name, resolve_path
from ...core.console import console, progress
from ...core.errors import WBCError
from ...core.io import atomic_path, write_json
from ...s1_data.cache import read_image, resize
from ...s1_data.damage import GROUPS, MAX_SEVERITY, damage
from ...s1_data.layout import data_root, read_splits
from ..restore.score import FEATURES, damage_features, fit_reference, score_features
from .features import shift_section
from .weights import domain_weights

MATCH_GROUPS = ("blur", "lighting", "noise")  # the simulator's default composite


def _mapped(fn, items, workers: int, desc: str) -> list:
    with progress() as bar, ThreadPoolExecutor(max(1, workers)) as pool:
        task = bar.add_task(desc, total=len(items), info="")
        out = []
        for r in pool.map(fn, items):
            out.append(r)
            bar.advance(task)
    return out


def _features(images, workers: int, desc: str) -> np.ndarray:
    return np.stack(_mapped(damage_features, images, workers, desc))


def _load(rows: pd.DataFrame, size: int, workers: int, desc: str) -> list[np.ndarray]:
    return _mapped(lambda r: resize(read_image(r.path, r.csv, r.row), size), list(rows.itertuples()), workers, desc)


def propose(images: list[np.ndarray], per_image: int, max_severity: int, seed: int):
    """Damaged copies from the broad proposal and their draws: severity (n,), kind index per group (n, G),
    -1 where the group was skipped."""
    rng = np.random.default_rng(seed)
    out, sev, kind = [], [], []
    for im in images:
        for _ in range(per_image):
            s = int(rng.integers(1, max_severity + 1))
            ks = [int(rng.integers(len(GROUPS[g]))) if rng.random() < 0.5 else -1 for g in MATCH_GROUPS]
            chosen = [GROUPS[g][k] for g, k in zip(MATCH_GROUPS, ks) if k >= 0]
            # One kind per chosen group: `damage` applies exactly these, in image-formation order.
            out.append(damage(im, s, np.random.default_rng(rng.integers(2**63)), kinds=chosen) if chosen else im)
            sev.append(s)
            kind.append(ks)
    return out, np.array(sev), np.array(kind)


class MixModel:
    """Logits of a damage mix and the weights it gives the proposals, differentiable (torch)."""

    def __init__(self, max_severity: int, init: dict | None = None, rng: np.random.Generator | None = None):
        import torch

        init = init or {}
        jitter = (lambda n: rng.normal(0, 1, n)) if rng is not None else (lambda n: np.zeros(n))
        # Starts kept off the sigmoid's flat ends, where Adam would barely move them.
        logit = lambda q: float(np.log(np.clip(q, 0.05, 0.95) / (1 - np.clip(q, 0.05, 0.95))))  # noqa: E731
        sw = np.asarray(init.get("severity_weights") or [1.0] * max_severity, float)
        gp = init.get("group_p") or {}
        kw = init.get("kind_weights") or {}
        t = lambda a: torch.tensor(np.asarray(a, float), dtype=torch.float64, requires_grad=True)  # noqa: E731
        self.p = t([logit(init.get("p", 0.5))] + jitter(1))
        self.sev = t(np.log(np.maximum(sw, 1e-3)) + jitter(max_severity))
        self.group = t([logit(gp.get(g, 1.0)) for g in MATCH_GROUPS] + jitter(len(MATCH_GROUPS)))
        self.kind = [t(np.log(np.maximum([float(kw.get(k, 1.0)) for k in GROUPS[g]], 1e-3)) + jitter(len(GROUPS[g])))
                     for g in MATCH_GROUPS]

    def params(self):
        return [self.p, self.sev, self.group, *self.kind]

    def weights(self, sev, kind, n_clean: int):
        """Sample weights (sum 1) over [undamaged images; proposals], and the proposals' effective sample size."""
        import torch

        log_r = torch.log_softmax(self.sev, 0)[torch.as_tensor(sev - 1)] + np.log(len(self.sev))
        q = torch.sigmoid(self.group)
        for j, g in enumerate(MATCH_GROUPS):
            on = torch.as_tensor(kind[:, j] >= 0)
            lk = torch.log_softmax(self.kind[j], 0)[torch.as_tensor(np.maximum(kind[:, j], 0))]
            # Proposal: the group with chance 1/2, then a uniform kind.
            log_r = log_r + torch.where(on, torch.log(q[j]) + lk + np.log(2 * len(GROUPS[g])),
                                        torch.log1p(-q[j]) + np.log(2))
        r = torch.softmax(log_r, 0)
        p = torch.sigmoid(self.p[0])
        w = torch.cat([(1 - p) / n_clean * torch.ones(n_clean, dtype=torch.float64), p * r])
        return w, float(1 / (r.detach() ** 2).sum())

    def mix(self, max_severity: int) -> dict:
        import torch

        with torch.no_grad():
            return {
                "p": round(float(torch.sigmoid(self.p[0])), 3),
                "max_severity": max_severity,
                "severity_weights": [round(float(v), 3) for v in torch.softmax(self.sev, 0)],
                "group_p": {g: round(float(v), 3) for g, v in zip(MATCH_GROUPS, torch.sigmoid(self.group))},
                "kind_weights": {k: round(float(v), 3) for j, g in enumerate(MATCH_GROUPS)
                                 for k, v in zip(GROUPS[g], torch.softmax(self.kind[j], 0))},
            }


def _pairwise(a: np.ndarray, b: np.ndarray):
    import torch

    return torch.cdist(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """2 E|X-Y| - E|X-X'| - E|Y-Y'| (0 only when the two samples' distributions agree)."""
    return float(2 * _pairwise(x, y).mean() - _pairwise(x, x).mean() - _pairwise(y, y).mean())


def fit_mix(clean: np.ndarray, prop: np.ndarray, sev: np.ndarray, kind: np.ndarray, target: np.ndarray,
            max_severity: int, init: dict, starts: int = 4, steps: int = 300, seed: int = 0) -> tuple[dict, dict]:
    """The mix minimising the weighted energy distance to `target` (features already standardised)."""
    import torch

    torch.manual_seed(seed)
    x = np.concatenate([clean, prop])
    d_xx = _pairwise(x, x)
    m = _pairwise(x, target).mean(1)
    d_yy = float(_pairwise(target, target).mean())
    rng = np.random.default_rng(seed)

    def energy(w):  # the weighted sample's energy distance to the target
        return 2 * w @ m - w @ d_xx @ w - d_yy

    best = None
    for start in range(starts):  # start 0 from the config's mix, the rest from jittered copies of it
        model = MixModel(max_severity, init, None if start == 0 else rng)
        opt = torch.optim.Adam(model.params(), lr=0.05)
        for _ in range(steps):
            loss = energy(model.weights(sev, kind, len(clean))[0])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            w, ess = model.weights(sev, kind, len(clean))
            ed = float(energy(w))
        if best is None or ed < best[0]:
            best = (ed, model.mix(max_severity), ess, start)
    return best[1], {"energy_distance_fit": best[0], "proposal_ess": best[2], "proposal_n": len(prop),
                     "best_start": best[3]}


def apply_mix(images: list[np.ndarray], mix: dict | None, seed: int) -> list[np.ndarray]:
    """`images` through the training transform's `DamageTransform` with `mix` (None: undamaged)."""
    if mix is None:
        return list(images)
    import albumentations as A

    from ...s1_data.damage import DamageTransform

    t = A.Compose([DamageTransform(max_severity=int(mix["max_severity"]), p=min(1.0, float(mix["p"])),
                                   severity_weights=mix.get("severity_weights"), group_p=mix.get("group_p"),
                                   kind_weights=mix.get("kind_weights"))], seed=seed)
    return [t(image=im)["image"] for im in images]


def config_mix(cfg: dict) -> dict:
    """The damage mix the config's training transform uses (p already scaled by augment.strength)."""
    a = cfg.get("augment") or {}
    dm = a.get("damage") or {}
    s = float(a.get("strength", 1.0))
    return {"p": min(1.0, float(dm.get("p", 0.0)) * s), "max_severity": int(dm.get("max_severity", 3)),
            **{k: dm[k] for k in ("severity_weights", "group_p", "kind_weights") if dm.get(k) is not None}}


def _png(path: Path, target: np.ndarray, named: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FEATURES), figsize=(4 * len(FEATURES), 3.2))
    for j, (ax, name) in enumerate(zip(axes, FEATURES)):
        lo, hi = np.quantile(np.concatenate([target[:, j], *[f[:, j] for f in named.values()]]), [0.005, 0.995])
        bins = np.linspace(lo, hi, 40)
        ax.hist(target[:, j], bins, density=True, color="0.7", label="target")
        for label, f in named.items():
            ax.hist(f[:, j], bins, density=True, histtype="step", lw=1.5, label=label)
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _policy_yaml(mix: dict, header: str) -> str:
    import yaml

    return header + yaml.safe_dump({"augment": {"damage": mix}}, sort_keys=False, default_flow_style=None)


def damage_match(cfg: dict, target: str | None = None, n_images: int = 1200, per_image: int = 2, n_check: int = 600,
                 max_severity: int | None = None, starts: int = 4, steps: int = 300, workers: int = 2,
                 seed: int = 0) -> dict:
    d = cfg["data"]
    target = target or d["test_split"]
    pool_splits = list(d["train_splits"])
    if target in pool_splits:
        raise WBCError(f"damage-match target '{target}' is part of the training pool {pool_splits}: pick another split")
    size = int(d["image_size"])
    base = config_mix(cfg)
    max_severity = int(max_severity or base["max_severity"])
    if not 1 <= max_severity <= MAX_SEVERITY:
        raise WBCError(f"--max-severity must be in 1..{MAX_SEVERITY}, got {max_severity}")
    root = data_root(cfg)
    rows = read_splits(root, list(dict.fromkeys(pool_splits + [target])))
    pool = rows[rows["split"].isin(pool_splits)].sample(frac=1.0, random_state=seed).reset_index(drop=True)
    if len(pool) < 20:
        raise WBCError(f"damage-match needs at least 20 pool images, got {len(pool)}")
    n_check = min(n_check, len(pool) // 3)
    n_images = min(n_images, len(pool) - n_check)
    fit_rows, check_rows = pool.iloc[:n_images], pool.iloc[n_images:n_images + n_check]
    tgt_rows = rows[rows["split"] == target]

    tgt = _features(_load(tgt_rows, size, workers, f"load {target}"), workers, f"features {target}")
    fit_imgs = _load(fit_rows, size, workers, "load pool (fit)")
    clean = _features(fit_imgs, workers, "features pool")
    prop_imgs, sev, kind = propose(fit_imgs, per_image, max_severity, seed)
    prop = _features(prop_imgs, workers, "features proposals")
    del prop_imgs
    mu, sd = tgt.mean(0), np.maximum(tgt.std(0), 1e-6)
    z = lambda f: (f - mu) / sd  # noqa: E731
    init = {**base, "max_severity": max_severity}
    if len(init.get("severity_weights") or []) != max_severity:
        init.pop("severity_weights", None)
    mix, fit_stats = fit_mix(z(clean), z(prop), sev, kind, z(tgt), max_severity, init, starts, steps, seed)

    check_imgs = _load(check_rows, size, workers, "load pool (check)")
    ref = fit_reference(clean)  # the pool as given (phase 2 images already damaged) is the score's zero here
    policies = {"no damage": None, "config": base, "fitted": mix}
    table, feats = {}, {}
    for name, m in policies.items():
        f = _features(apply_mix(check_imgs, m, seed + 1), workers, f"check: {name}")
        feats[name] = f
        table[name] = {"domain_auc": domain_weights(f, tgt, seed=seed).auc,
                       "energy_distance": energy_distance(z(f), z(tgt)),
                       "damage_score_q10_50_90": np.quantile(score_features(f, ref), [0.1, 0.5, 0.9]).round(3).tolist()}
    q = np.quantile(score_features(tgt, ref), [0.1, 0.5, 0.9])
    table["target"] = {"damage_score_q10_50_90": q.round(3).tolist()}

    out = resolve_path(shift_section(cfg)["match_dir"]) / \
        f"{dataset_name(cfg)}_{size}_{target}"
    report = {"target": target, "image_size": size, "n_target": len(tgt), "n_fit_images": len(fit_rows),
              "per_image": per_image, "n_check_images": len(check_rows), "seed": seed, "config_mix": base,
              "fitted_mix": mix, "fit": fit_stats, "check": table}
    write_json(out / "report.json", report)
    strength = float((cfg.get("augment") or {}).get("strength", 1.0))
    header = (f"# `make damage-match` for {dataset_name(cfg)} at {size} px, target {target}: domain AUC "
              f"{table['fitted']['domain_auc']:.3f} (config's mix {table['config']['domain_auc']:.3f}, no damage "
              f"{table['no damage']['domain_auc']:.3f}).\n# p is the fitted chance {mix['p']} divided by the config's "
              f"augment.strength ({strength:g}), which multiplies it back.\n")
    with atomic_path(out / "policy.yaml", suffix=".yaml") as tmp:
        Path(tmp).write_text(_policy_yaml({**mix, "p": round(mix["p"] / strength, 3)}, header))
    _png(out / "features.png", tgt, {k: feats[k] for k in ("config", "fitted")})
    _print(report, out)
    return report


def _print(report: dict, out: Path) -> None:
    from rich.table import Table

    t = Table(title=f"damage mix vs {report['target']} ({report['image_size']} px; {report['n_check_images']} "
                    f"held-out pool images)")
    for c in ("mix", "domain AUC", "energy distance", "damage score q10 / q50 / q90"):
        t.add_column(c)
    for name, r in report["check"].items():
        q = " / ".join(f"{v:.2f}" for v in r["damage_score_q10_50_90"])
        t.add_row(name, f"{r['domain_auc']:.3f}" if "domain_auc" in r else "",
                  f"{r['energy_distance']:.3f}" if "energy_distance" in r else "", q)
    console.print(t)
    m = report["fitted_mix"]
    console.print(f"fitted mix: p {m['p']}, severities {m['severity_weights']}, groups {m['group_p']}; proposal ESS "
                  f"{report['fit']['proposal_ess']:.0f} of {report['fit']['proposal_n']}")
    console.print(f"wrote {out}/policy.yaml (paste its augment block into a config), report.json, features.png")
