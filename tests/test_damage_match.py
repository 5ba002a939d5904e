"""`make damage-match`: the augmentation's damage mix fitted to a target split's damage features."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from wbc.core.errors import WBCError
from wbc.optional.shift.match import MATCH_GROUPS, MixModel, energy_distance, fit_mix
from wbc.s1_data.damage import GROUPS

PLANTED = {"p": 0.8, "max_severity": 4, "severity_weights": [0.1, 0.1, 0.2, 0.6],
           "group_p": {"blur": 0.2, "lighting": 0.9, "noise": 0.6},
           "kind_weights": {"gaussian_noise": 0.7, "color_noise": 0.1, "salt_pepper": 0.1, "iso_noise": 0.1}}


def _world(seed=0):
    """Synthetic damage features: each kind pushes the clean features along its own direction, by severity."""
    rng = np.random.default_rng(seed)
    direction = {k: rng.normal(size=5) for g in MATCH_GROUPS for k in GROUPS[g]}

    def draw(n, mix, proposal):
        clean = rng.normal(0, 0.3, (n, 5))
        sev = rng.choice(np.arange(1, 5), n, p=None if proposal else np.array(mix["severity_weights"]))
        kind = np.full((n, len(MATCH_GROUPS)), -1)
        for j, g in enumerate(MATCH_GROUPS):
            q = 0.5 if proposal else mix["group_p"][g]
            w = np.array([1.0 if proposal else mix["kind_weights"].get(k, 1.0) for k in GROUPS[g]])
            on = rng.random(n) < q
            kind[on, j] = rng.choice(len(w), on.sum(), p=w / w.sum())
        f = clean.copy()
        for j, g in enumerate(MATCH_GROUPS):
            for i in np.flatnonzero(kind[:, j] >= 0):
                f[i] += 0.4 * sev[i] * direction[GROUPS[g][kind[i, j]]]
        if not proposal:  # undamaged with chance 1 - p
            f = np.where((rng.random(n) < mix["p"])[:, None], f, clean)
        return clean, f, sev, kind

    return draw


def test_uniform_mix_weights_the_proposals_equally():
    model = MixModel(4, {"p": 0.5, "group_p": {g: 0.5 for g in MATCH_GROUPS}})
    rng = np.random.default_rng(0)
    sev, kind = rng.integers(1, 5, 50), rng.integers(-1, 3, (50, 3))
    w, ess = model.weights(sev, kind, 30)
    w = w.detach().numpy()
    assert w.sum() == pytest.approx(1.0) and np.allclose(w[:30], 0.5 / 30) and np.allclose(w[30:], 0.5 / 50)
    assert ess == pytest.approx(50)


@pytest.mark.slow
def test_fit_recovers_a_planted_mix():
    draw = _world()
    clean, prop, sev, kind = draw(1200, None, proposal=True)
    _, target, _, _ = draw(1200, PLANTED, proposal=False)
    init = {"p": 0.5, "max_severity": 4}
    mix, stats = fit_mix(clean[:600], prop, sev, kind, target, 4, init, starts=2, steps=250)
    assert abs(mix["p"] - 0.8) < 0.12
    assert int(np.argmax(mix["severity_weights"])) == 3 and mix["severity_weights"][3] > 0.4
    assert mix["group_p"]["blur"] < 0.4 and mix["group_p"]["lighting"] > 0.7
    assert mix["kind_weights"]["gaussian_noise"] == max(mix["kind_weights"][k] for k in GROUPS["noise"])
    # The fitted mix, drawn afresh, is closer to the target than the starting mix.
    _, fresh_fit, _, _ = draw(1200, mix, proposal=False)
    start = {"p": 0.5, "severity_weights": [0.25] * 4, "group_p": {g: 1.0 for g in MATCH_GROUPS}, "kind_weights": {}}
    _, fresh_start, _, _ = draw(1200, start, proposal=False)
    assert energy_distance(fresh_fit, target) < energy_distance(fresh_start, target) / 3
    assert 0 < stats["proposal_ess"] <= len(prop)


@pytest.mark.slow
def test_damage_match_on_the_sample_data(sample_root, make_cfg, tmp_path, monkeypatch):
    from wbc.core.config import CONFIG_DIR, load_config
    from wbc.optional.shift import match
    from wbc.optional.shift.match import damage_match
    from wbc.s1_data.augment import build_transform
    from wbc.s1_data.damage import DamageTransform

    loaded = {}
    real = match._load
    monkeypatch.setattr(match, "_load", lambda rows, size, w, desc: (loaded.setdefault(desc, set(rows["ID"])),
                                                                    real(rows, size, w, desc))[1])
    cfg = make_cfg(sample_root, f"shift.match_dir={tmp_path / 'match'}", "augment.strength=0.5")
    rep = damage_match(cfg, n_images=120, per_image=2, n_check=80, starts=2, steps=150)
    # The check damages pool images the fit never saw.
    assert len(loaded["load pool (check)"]) == 80 and not loaded["load pool (check)"] & loaded["load pool (fit)"]
    assert rep["config_mix"]["p"] == pytest.approx(0.3 * 0.5)  # the config's p scaled by augment.strength
    c = rep["check"]
    # The sample test split is damaged at severity 2-3 with every group: the tiny config (p 0.3 x 0.5) under-damages.
    assert c["fitted"]["energy_distance"] < c["config"]["energy_distance"] < c["no damage"]["energy_distance"]
    assert c["fitted"]["domain_auc"] < c["no damage"]["domain_auc"]
    assert rep["fitted_mix"]["p"] > 0.5
    out = tmp_path / "match" / "sample_64_phase2_test"
    assert json.loads((out / "report.json").read_text())["fitted_mix"] == rep["fitted_mix"]
    assert (out / "features.png").stat().st_size > 0
    # policy.yaml is a config block: a config built on it trains with the fitted mix.
    block = yaml.safe_load((out / "policy.yaml").read_text())
    exp = tmp_path / "matched.yaml"
    exp.write_text(yaml.safe_dump({"base": str(CONFIG_DIR / "recipes/tiny_cpu.yaml"), **block}))
    t = [op for op in build_transform(load_config(exp, ["augment.strength=0.5"]), True).transforms
         if isinstance(op, DamageTransform)][0]
    assert t.p == pytest.approx(min(1.0, rep["fitted_mix"]["p"]), abs=0.002)  # strength multiplies p back
    assert t.severity_weights == rep["fitted_mix"]["severity_weights"] and t.group_p == rep["fitted_mix"]["group_p"]
    with pytest.raises(WBCError, match="part of the training pool"):
        damage_match(cfg, target="phase1")


def test_fit_keeps_the_best_of_several_starts():
    """With no optimisation steps every start is scored as drawn: the fit must return the best of them, not start 0."""
    draw = _world(1)
    clean, prop, sev, kind = draw(400, None, proposal=True)
    _, target, _, _ = draw(400, PLANTED, proposal=False)
    init = {"p": 0.1, "max_severity": 4, "group_p": {"blur": 0.9, "lighting": 0.1, "noise": 0.1}}
    mix0, s0 = fit_mix(clean[:200], prop, sev, kind, target, 4, init, starts=1, steps=0)
    mix8, s8 = fit_mix(clean[:200], prop, sev, kind, target, 4, init, starts=8, steps=0)
    assert s8["best_start"] != 0 and s8["energy_distance_fit"] < s0["energy_distance_fit"] and mix8 != mix0


def test_apply_mix_uses_the_mixs_severity_weights():
    from wbc.optional.restore.pix2pix import psnr
    from wbc.optional.shift.match import apply_mix

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    img = np.clip(np.stack([150 + 60 * np.sin(xx / 7), 120 + 50 * np.cos(yy / 9), 180 + 0 * xx], -1), 0, 255)
    images = [np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8) for _ in range(12)]
    noise_only = {"p": 1.0, "max_severity": 4, "group_p": {"blur": 0.0, "lighting": 0.0, "noise": 1.0},
                  "kind_weights": {"gaussian_noise": 1.0, "color_noise": 0.0, "salt_pepper": 0.0, "iso_noise": 0.0}}
    light = apply_mix(images, {**noise_only, "severity_weights": [1, 0, 0, 0]}, seed=0)
    heavy = apply_mix(images, {**noise_only, "severity_weights": [0, 0, 0, 1]}, seed=0)
    assert [a is b for a, b in zip(apply_mix(images, None, 0), images)] == [True] * 12
    p_light = np.mean([psnr(a, b) for a, b in zip(light, images)])
    p_heavy = np.mean([psnr(a, b) for a, b in zip(heavy, images)])
    assert p_heavy < p_light - 3


def test_proposal_covers_every_severity_and_group_choice():
    from wbc.optional.shift.match import propose

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(10)]
    out, sev, kind = propose(images, 8, 4, seed=0)
    assert len(out) == len(sev) == len(kind) == 80 and kind.shape == (80, len(MATCH_GROUPS))
    assert set(sev.tolist()) == {1, 2, 3, 4}
    for j, g in enumerate(MATCH_GROUPS):
        assert 0.3 < (kind[:, j] >= 0).mean() < 0.7 and set(kind[kind[:, j] >= 0, j]) <= set(range(len(GROUPS[g])))
    none = np.flatnonzero((kind < 0).all(1))
    assert len(none) and all(out[i] is images[i // 8] for i in none)  # no group drawn: the image as it is
    some = np.flatnonzero((kind >= 0).any(1))
    assert all(not np.array_equal(out[i], images[i // 8]) for i in some)
