"""Damage gate, Pix2Pix training steps, Restorer contract, checkpoints and the two CLI commands (CPU, tiny)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from wbc.__main__ import main
from wbc.core.errors import WBCError
from wbc.optional.restore.pairs import PairDataset, simulate, to_tensor
from wbc.optional.restore.pix2pix import Pix2Pix, Restorer, build_generator, psnr, train_pix2pix
from wbc.optional.restore.score import Gate, damage_score, fit_gate
from wbc.s1_data.damage import damage

TINY = {"encoder": "tu-mobilenetv3_small_050", "decoder_channels": [32, 16, 16, 8, 8], "ndf": 8, "epochs": 2,
        "batch_size": 4, "lr": 1e-3, "lambda_l1": 100, "gan_mode": "vanilla", "num_workers": 0}


@pytest.fixture(autouse=True)
def one_thread():
    # Two contended cores: intra-op threads waiting on each other cost more than they give.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cells(n: int, size: int = 96, seed: int = 0) -> np.ndarray:
    """Smooth synthetic smears: cream background, pink red cells, one purple-nucleated white cell."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        img = np.full((size, size, 3), (232, 214, 200), np.uint8)
        for _ in range(6):
            c = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.circle(img, c, size // 8, (215, 160, 165), -1)
        c = tuple(int(v) for v in size // 2 + rng.integers(-size // 10, size // 10, 2))
        cv2.circle(img, c, size // 5, (190, 160, 210), -1)
        cv2.ellipse(img, c, (size // 8, size // 11), float(rng.uniform(0, 180)), 0, 360, (110, 60, 150), -1)
        img = cv2.GaussianBlur(img, (0, 0), 1.2).astype(np.float32)
        out[k] = np.clip(img + rng.normal(0, 1.5, img.shape), 0, 255).round().astype(np.uint8)
    return out


def damaged(images: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([damage(im, int(rng.integers(1, 4)), rng) for im in images])


def test_fit_gate_threshold_maximises_balanced_accuracy():
    # Cut at 1.05: 3/4 clean pass + 3/3 caught (0.875) beats 1.2..3.0: 4/4 + 2/3 (0.833).
    assert fit_gate([0.1, 0.5, 1.0, 1.2], [3.0, 4.0, 1.1]) == pytest.approx(1.05)
    assert fit_gate([0.0, 1.0], [2.0, 5.0]) == pytest.approx(1.5)


def test_gate_separates_clean_from_damaged_synthetic_cells(tmp_path):
    clean = cells(48, seed=1)
    gate = Gate.fit(clean[:24], damaged(clean[:24], seed=2))
    assert gate.stats["balanced_accuracy"] > 0.9
    scores, flags = gate(np.concatenate([clean[24:], damaged(clean[24:], seed=3)]))
    held_clean, held_dmg = flags[:24], flags[24:]
    assert (1 - held_clean.mean() + held_dmg.mean()) / 2 > 0.85
    assert np.median(scores[24:]) > np.median(scores[:24])
    gate.save(tmp_path / "gate.json")
    again = Gate.load(tmp_path / "gate.json")
    assert again.threshold == gate.threshold and np.allclose(again.scores(clean[24:27]), scores[:3])
    assert damage_score(clean[0]) >= 0


def test_pairs_are_deterministic_for_seed_epoch_and_index():
    imgs = cells(3, size=64)
    a, b = PairDataset(imgs, seed=5), PairDataset(imgs, seed=5)
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x, y)
    b.set_epoch(1)
    assert not torch.equal(a[1][0], b[1][0])
    assert a[0][0].shape == (3, 64, 64) and a[0][0].min() >= -1 and a[0][0].max() <= 1
    assert np.array_equal(simulate(imgs, 2, 9), simulate(imgs, 2, 9))


def test_generator_steps_lower_l1_on_a_fixed_batch():
    torch.manual_seed(0)
    clean = cells(4, size=64, seed=4)
    dmg = simulate(clean, 2, 0, kinds=("gain",))
    x, y = to_tensor(dmg), to_tensor(clean)
    model = Pix2Pix(TINY, torch.device("cpu"))
    losses = [model.step(x, y)["l1"] for _ in range(8)]
    assert losses[0] == pytest.approx(float((x - y).abs().mean()), abs=0.01)  # starts as the identity
    assert min(losses[-3:]) < 0.8 * losses[0]


def test_generator_loss_is_adversarial_plus_lambda_l1_and_adam_uses_beta1():
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    clean = cells(2, size=64, seed=12)
    x, y = to_tensor(simulate(clean, 2, 0)), to_tensor(clean)
    model = Pix2Pix({**TINY, "lambda_l1": 7.0}, torch.device("cpu"))
    for opt in (model.opt_g, model.opt_d):
        assert opt.param_groups[0]["betas"] == (0.5, 0.999)
    G0 = copy.deepcopy(model.G)
    model.step(x, y)
    # The generator's gradients are those of BCE(D(x, G(x)), real) + 7 * L1, D already updated this step.
    fake = G0(x)
    logits = model.D(x, fake)
    loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)) + 7.0 * F.l1_loss(fake, y)
    loss.backward()
    for (name, a), b in zip(model.G.named_parameters(), G0.parameters()):
        if b.grad is not None and b.grad.abs().max() > 0:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_learning_rate_decays_linearly_and_resumes_mid_schedule(tmp_path, monkeypatch):
    from wbc.optional.restore import pix2pix

    imgs = cells(4, size=64, seed=13)
    rc = {**TINY, "epochs": 4, "steps_per_epoch": 1}
    real_step, calls = pix2pix.Pix2Pix.step, []

    def killed_in_epoch_3(self, d, c):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, d, c)

    monkeypatch.setattr(pix2pix.Pix2Pix, "step", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_pix2pix(rc, imgs, tmp_path, torch.device("cpu"), seed=0)
    monkeypatch.setattr(pix2pix.Pix2Pix, "step", real_step)
    train_pix2pix(rc, imgs, tmp_path, torch.device("cpu"), seed=0)  # resumes at epoch 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # constant for the first half of the epochs, then linear towards zero: 1, 1, 2/3, 1/3 x lr
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["lr"] for r in rows], [1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3], rtol=1e-6)


def test_simulated_pairs_are_the_same_faults_made_stronger():
    imgs = cells(8, size=64, seed=14)
    ps = np.array([[psnr(a, b) for a, b in zip(simulate(imgs, sev, 3), imgs)] for sev in (1, 2, 3)])
    assert (np.diff(ps, axis=0) < 0).all(), ps


def test_pairs_draw_every_severity_up_to_the_maximum(monkeypatch):
    from wbc.optional.restore import pairs

    seen = []
    monkeypatch.setattr(pairs, "damage", lambda im, sev, rng, kinds=None: (seen.append(sev), im)[1])
    ds = PairDataset(cells(40, size=32), max_severity=3, seed=0)
    for i in range(len(ds)):
        ds[i]
    assert set(seen) == {1, 2, 3}


def test_restorer_keeps_size_dtype_and_passes_clean_images_through():
    clean = cells(8, size=96, seed=6)
    gate = Gate.fit(clean, damaged(clean, seed=7))
    odd = np.stack([cv2.resize(im, (88, 72)) for im in clean[:4]])  # not a multiple of 32: padded, cropped back
    batch = np.concatenate([odd[:2], simulate(odd[2:], 3, 1, kinds=("gaussian_noise",))])
    restorer = Restorer(build_generator(TINY), gate)
    out, scores, mask = restorer(batch)
    assert out.shape == batch.shape and out.dtype == np.uint8 and scores.shape == (4,)
    assert mask.tolist() == [False, False, True, True]
    assert np.array_equal(out[:2], batch[:2])
    out, _, mask = Restorer(build_generator(TINY), gate, image_size=64)(batch)  # works at 64, back to 72x88
    assert out.shape == batch.shape and out.dtype == np.uint8 and np.array_equal(out[~mask], batch[~mask])


def test_checkpoints_load_weights_only_and_training_resumes(tmp_path):
    imgs = cells(8, size=64, seed=8)
    rc = {**TINY, "epochs": 1, "steps_per_epoch": 2}
    G = train_pix2pix(rc, imgs, tmp_path, torch.device("cpu"), seed=0)
    for name in ("generator.pt", "state.pt"):
        torch.load(tmp_path / name, map_location="cpu", weights_only=True)
    G2 = build_generator(rc)
    G2.load_state_dict(torch.load(tmp_path / "generator.pt", weights_only=True))
    x = to_tensor(imgs[:2])
    assert torch.allclose(G.eval()(x), G2.eval()(x))
    train_pix2pix({**rc, "epochs": 2}, imgs, tmp_path, torch.device("cpu"), seed=0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"epoch": ')[1].split(",")[0]) for line in lines] == [1, 2]


def _layout(root, n1=24, n_test=6):
    """A minimal WBCBench-layout dataset: clean phase1, damaged phase2_train, odd-sized phase2_test."""
    clean = cells(n1 + 8 + n_test, size=96, seed=10)
    train = np.concatenate([clean[n1:n1 + 4], damaged(clean[n1 + 4:n1 + 8], 11)])
    splits = {"phase1": ("phase1_label.csv", "phase1", clean[:n1]),
              "phase2_train": ("phase2_train.csv", "phase2/train", train),
              "phase2_test": ("phase2_test.csv", "phase2/test", clean[n1 + 8:])}
    for k, (csv, folder, imgs) in enumerate(splits.values()):
        (root / folder).mkdir(parents=True)
        ids = [f"{k + 1}{i:07d}.{'png' if i % 2 else 'jpg'}" for i in range(len(imgs))]
        for i, (name, im) in enumerate(zip(ids, imgs)):
            if k == 2:
                im = cv2.resize(im, (80, 100)) if i % 2 else damage(im, 3, np.random.default_rng(i))
            cv2.imwrite(str(root / folder / name), cv2.cvtColor(im, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        pd.DataFrame({"ID": ids, "labels": "" if k == 2 else "LY"}).to_csv(root / csv, index=False)
    return splits["phase2_test"]


@pytest.mark.slow
def test_train_restorer_and_restore_commands(tmp_path):
    data = tmp_path / "data"
    _layout(data)
    for f in (data / "phase2" / "test").glob("*.png"):  # other bytes than cv2's default for the same pixels
        cv2.imwrite(str(f), cv2.imread(str(f)), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    tiny = {**TINY, "epochs": 1, "steps_per_epoch": 2}
    common = [f"data.root={data}", "device=cpu", "data.image_size=64", f"restorer.out_dir={tmp_path / 'run'}",
              f"restorer.restored_dir={tmp_path / 'restored'}", "restorer.holdout=4", "restorer.gate_images=12",
              "restorer.qa_rows=3"] + [f"restorer.{k}={v}" for k, v in tiny.items()]
    assert main(["train-restorer", *common]) == 0
    run = tmp_path / "run"
    for name in ("generator.pt", "gate.json", "config.yaml", "metrics.jsonl", "qa.png", "eval.json"):
        assert (run / name).exists(), name
    ev = json.loads((run / "eval.json").read_text())
    g = ev["gated_splits"]["phase2_train"]
    assert g["n"] == 8 and 0 < g["clean"] < 8  # the damaged copies are scored damaged ...
    assert ev["train_images"] == 24 - 4 + g["clean"]  # ... and only the clean-scored ones join the pairs
    assert Restorer.load(run).gate.threshold > 0
    assert main(["restore", "--split", "phase2_test", *common]) == 0
    out = tmp_path / "restored" / "data" / "phase2_test"
    res = pd.read_csv(out / "restored.csv", dtype={"ID": str})
    src = pd.read_csv(data / "phase2_test.csv", dtype={"ID": str})
    assert res["ID"].tolist() == src["ID"].tolist() and set(res["restored"]) <= {0, 1}
    for i in res["ID"]:
        a, b = cv2.imread(str(out / i)), cv2.imread(str(data / "phase2" / "test" / i))
        assert a.shape == b.shape and a.dtype == np.uint8
    for i in res.loc[res["restored"] == 0, "ID"]:  # gate-clean images are copied byte for byte
        assert (out / i).read_bytes() == (data / "phase2" / "test" / i).read_bytes()
    assert 0 < res["restored"].sum() < len(res)
    # On-the-fly restoration at cache time (data.restore=true): gated phase2 images change, phase1 does not.
    from wbc.core.config import load_config
    from wbc.s1_data.cache import load_images
    from wbc.s1_data.layout import read_splits
    from wbc.s1_data.preprocess import build_preprocess

    sd = torch.load(run / "generator.pt", weights_only=True)  # perturb: a 2-step generator is near identity
    g = torch.Generator().manual_seed(0)
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                for k, v in sd.items()}, run / "generator.pt")
    cfg = load_config(None, [f"data.root={data}", "data.image_size=64", f"data.cache_dir={tmp_path / 'cache'}",
                             "data.restore=true", f"data.restore_dir={run}", "data.name=d"])
    df = read_splits(data, ["phase1", "phase2_test"])
    pre = build_preprocess(cfg)
    restored = load_images(cfg, df, pre)
    plain = load_images({**cfg, "data": {**cfg["data"], "restore": False}}, df)
    p1 = (df["split"] == "phase1").to_numpy()
    assert np.array_equal(restored[p1], plain[p1])
    out, _, mask = Restorer.load(run)(np.asarray(plain[~p1]))
    changed = np.array([not np.array_equal(a, b) for a, b in zip(restored[~p1], plain[~p1])])
    assert mask.any() and np.array_equal(changed, mask)
    assert np.array_equal(np.asarray(restored[~p1]), out)
    # a retrained restorer gets a cache of its own instead of its predecessor's images
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                for k, v in sd.items()}, run / "generator.pt")
    again = load_images(cfg, df, build_preprocess(cfg))
    assert not np.array_equal(np.asarray(again[~p1]), np.asarray(restored[~p1]))
    assert np.array_equal(np.asarray(again[~p1]), Restorer.load(run)(np.asarray(plain[~p1]))[0])


def test_damage_features_are_measured_at_224_px_on_the_background():
    from wbc.optional.restore.score import damage_features

    img = cells(1, size=224, seed=0)[0]
    big = cv2.resize(img, (448, 448), interpolation=cv2.INTER_CUBIC)
    small = cells(1, size=96, seed=0)[0]
    np.testing.assert_allclose(damage_features(big),
                               damage_features(cv2.resize(big, (224, 224), interpolation=cv2.INTER_AREA)))
    np.testing.assert_allclose(damage_features(small),
                               damage_features(cv2.resize(small, (224, 224), interpolation=cv2.INTER_CUBIC)))
    # background L, a, b: the plasma's (232, 214, 200) RGB = Lab (221, 132, 137), not pulled by the cell
    np.testing.assert_allclose(damage_features(img)[1:4], [221, 132, 137], atol=1.0)


def test_score_is_rms_of_robust_z_and_gate_file_checks_features(tmp_path):
    from wbc.optional.restore.score import fit_reference, score_features

    ref = {"center": [0.0] * 5, "scale": [1.0, 2.0, 1.0, 1.0, 1.0]}
    assert score_features(np.array([3.0, 8.0, 0, 0, 0]), ref)[0] == pytest.approx(np.sqrt((9 + 16) / 5))
    feats = np.array([[1.0, 2, 3, 4, 5], [1.0, 2, 3, 4, 7], [1.0, 2, 3, 4, 9]])  # first four constant
    r = fit_reference(feats)
    assert r["center"] == [1, 2, 3, 4, 7] and r["scale"][:4] == [1e-3] * 4
    assert r["scale"][4] == pytest.approx(1.4826 * 2) and np.isfinite(score_features(feats, r)).all()
    Gate(1.0).save(tmp_path / "gate.json")
    d = json.loads((tmp_path / "gate.json").read_text())
    d["features"] = ["log_noise"]
    (tmp_path / "gate.json").write_text(json.dumps(d))
    with pytest.raises(WBCError, match="fitted on features"):
        Gate.load(tmp_path / "gate.json")
