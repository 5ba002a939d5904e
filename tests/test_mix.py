"""Mixup / CutMix / Remix: the mixed pixels and targets by hand, the Remix rule, seeding, and the training loop."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import write_folds
from wbc.core import hooks
from wbc.core.errors import WBCError
from wbc.optional.mix import Mixer, build_mixer, cutmix_box, label_weights, mix_images, mix_targets
from wbc.s3_train import optim
from wbc.s3_train.loop import train_fold

COUNTS = np.array([100, 10, 30])  # class 0 frequent, 1 rare, 2 in between (ratio 0/2 = 3.33, 2/1 = 3)


def _batch(b=4, h=6, w=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, h, w, generator=g)


def test_mixup_blends_each_image_with_its_reverse():
    x = _batch()
    out, lam = mix_images(x, 0.3)
    assert lam == 0.3
    for k in range(4):
        assert torch.allclose(out[k], 0.3 * x[k] + 0.7 * x[3 - k])


def test_cutmix_pastes_the_box_and_remeasures_lam():
    x = _batch(h=10, w=10)
    out, lam = mix_images(x, 0.5, (2, 6, 0, 5))  # a 4 x 5 box of 100 pixels
    assert lam == pytest.approx(0.8)
    inside = torch.zeros(10, 10, dtype=torch.bool)
    inside[2:6, 0:5] = True
    for k in range(4):
        assert torch.equal(out[k][:, inside], x[3 - k][:, inside])
        assert torch.equal(out[k][:, ~inside], x[k][:, ~inside])
    # The box covers about 1 - lam of the image, and is clipped at the border.
    rng = np.random.default_rng(0)
    areas = [np.prod(np.diff(np.reshape(cutmix_box(64, 64, 0.75, rng), (2, 2)), axis=1)) for _ in range(200)]
    assert max(areas) <= 32 * 32 and np.mean(areas) < 32 * 32 and np.median(areas) > 0.3 * 32 * 32


def test_targets_mix_one_hots_with_the_partners():
    y = torch.tensor([0, 1, 2, 2])
    t = mix_targets(y, label_weights(y, 0.3, COUNTS), 3)
    expected = torch.tensor([[0.3, 0.0, 0.7], [0.0, 0.3, 0.7], [0.0, 0.7, 0.3], [0.7, 0.0, 0.3]])
    assert torch.allclose(t, expected)
    assert torch.allclose(t.sum(1), torch.ones(4))


def test_remix_gives_the_rare_class_the_label_when_it_dominates_the_pixels():
    # Pairs: (0 frequent, 1 rare) at positions 0 / 3 and (2, 2) at 1 / 2.
    y = torch.tensor([0, 2, 2, 1])
    # lam 0.3: each image holds 0.3 of its own mix. Image 0 (frequent) is 70 % the rare image -> rare label only;
    # image 3 (rare) holds only 30 % of itself -> plain lam; the same-class pair keeps lam (ratio 1).
    w = label_weights(y, 0.3, COUNTS, kappa=3.0, tau=0.5)
    assert w.tolist() == pytest.approx([0.0, 0.3, 0.3, 0.3])
    t = mix_targets(y, w, 3)
    assert t[0].tolist() == [0.0, 1.0, 0.0]
    # lam 0.7: the rare image 3 holds 70 % of itself -> its own label alone; image 0 keeps lam.
    assert label_weights(y, 0.7, COUNTS, kappa=3.0, tau=0.5).tolist() == pytest.approx([0.7, 0.7, 0.7, 1.0])
    # Below kappa nothing changes: classes 0 and 2 differ by 3.33x, so kappa 4 leaves lam alone.
    y2 = torch.tensor([0, 2])
    assert label_weights(y2, 0.3, COUNTS, kappa=4.0).tolist() == pytest.approx([0.3, 0.3])
    assert label_weights(y2, 0.3, COUNTS, kappa=3.0).tolist() == pytest.approx([0.0, 0.3])
    # Off (kappa 0): plain lam whatever the counts.
    assert label_weights(y, 0.3, COUNTS).tolist() == pytest.approx([0.3] * 4)


def test_mixer_is_seeded_by_seed_and_epoch_and_honours_prob():
    x, y = _batch(), torch.tensor([0, 1, 2, 0])
    mix = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}
    a = Mixer(mix, COUNTS, 42, 3)(x, y)
    b = Mixer(mix, COUNTS, 42, 3)(x, y)
    c = Mixer(mix, COUNTS, 42, 4)(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    # prob 0: the batch passes through with one-hot targets.
    xo, to = Mixer({**mix, "prob": 0.0}, COUNTS, 42, 3)(x, y)
    assert torch.equal(xo, x) and torch.equal(to, F.one_hot(y, 3).float())
    # Mixup only: every output is a blend, so no pixel equals its input.
    xm, tm = Mixer({"mixup_alpha": 0.4}, COUNTS, 0, 0)(x, y)
    assert not torch.isclose(xm, x).any() and torch.allclose(tm.sum(1), torch.ones(4))


def test_build_mixer_off_switches_and_errors():
    t = {"epochs": 5, "mix": {"mixup_alpha": 0.2, "off_epochs": 2}}
    assert build_mixer({"epochs": 5}, COUNTS, 0, 0) is None
    assert isinstance(build_mixer(t, COUNTS, 0, 2), Mixer)
    assert build_mixer(t, COUNTS, 0, 3) is None and build_mixer(t, COUNTS, 0, 4) is None
    with pytest.raises(WBCError, match="train.mix and train.consistency cannot be combined"):
        hooks.single("train_batch", {"train": {**t, "consistency": {"weight": 1.0}}})
    with pytest.raises(WBCError, match="remix_kappa"):
        build_mixer({"epochs": 5, "mix": {"cutmix_alpha": 1.0, "remix_kappa": 0.5}}, COUNTS, 0, 0)
    with pytest.raises(WBCError, match="unknown train.mix"):
        build_mixer({"epochs": 5, "mix": {"mixup": 0.2}}, COUNTS, 0, 0)


@pytest.mark.slow
def test_training_feeds_mixed_soft_targets_to_the_loss_and_resumes_exactly(sample_root, make_cfg, monkeypatch):
    """A fold run with Mixup + CutMix + Remix: the loss sees (B, C) targets that are real mixtures in the mixed
    epochs and class indices in the unmixed last one; a killed run resumes to the same weights."""
    seen = []
    real = optim.stage_loss

    def recording(t, counts, stage, device, classes=None):
        fn = real(t, counts, stage, device, classes)

        def call(logits, target):
            seen.append((len(seen), target.detach().clone()))
            return fn(logits, target)
        return call

    monkeypatch.setattr(optim, "stage_loss", recording)
    over = ["folds.n_folds=2", "train.epochs=3", "train.mix.mixup_alpha=0.4", "train.mix.cutmix_alpha=1.0",
            "train.mix.remix_kappa=3", "train.mix.off_epochs=1"]
    cfg = make_cfg(sample_root, *over)
    write_folds(cfg)
    res = train_fold(cfg, 0)
    steps = len(seen) // 3
    mixed, last = [t for _, t in seen[: 2 * steps]], [t for _, t in seen[2 * steps:]]
    assert all(t.ndim == 2 and torch.allclose(t.sum(1), torch.ones(len(t))) for t in mixed)
    assert all(t.ndim == 1 for t in last)                                         # off_epochs: plain labels
    assert sum(bool(((t > 0) & (t < 1)).any()) for t in mixed) >= steps          # real mixtures
    plain = make_cfg(sample_root, "name=plain", "folds.n_folds=2", "train.epochs=3")
    assert [h["train_loss"] for h in train_fold(plain, 0)["history"]] != [h["train_loss"] for h in res["history"]]

    short = make_cfg(sample_root, "name=resumed", *over)

    def kill(epoch, rec):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold(short, 0, on_epoch=kill)
    assert [h["train_loss"] for h in train_fold(short, 0, resume=True)["history"]] == \
        [h["train_loss"] for h in res["history"]]


def test_switch_prob_chooses_between_mixup_and_cutmix():
    x, y = _batch(h=16, w=16), torch.tensor([0, 1, 2, 0])
    both = {"mixup_alpha": 8.0, "cutmix_alpha": 1.0}  # Mixup lam near 0.5: no pixel stays its own
    for epoch in range(8):
        xm, _ = Mixer({**both, "switch_prob": 0.0}, COUNTS, 0, epoch)(x, y)
        assert not torch.isclose(xm, x).any()  # Mixup: every pixel is a blend
        xc, _ = Mixer({**both, "switch_prob": 1.0}, COUNTS, 0, epoch)(x, y)
        assert torch.isclose(xc, x).any()  # CutMix: pixels outside the box are the image's own


def test_mixup_lam_is_drawn_from_a_symmetric_beta():
    x, y = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1), torch.tensor([0, 1])
    lams = np.array([float(Mixer({"mixup_alpha": 0.4}, COUNTS, 0, e)(x, y)[0][0]) for e in range(400)])
    # Beta(0.4, 0.4): mean 0.5, variance 1 / (4 (2a + 1)) = 0.139
    assert abs(lams.mean() - 0.5) < 0.05 and lams.var() == pytest.approx(1 / 7.2, rel=0.2)


def test_remix_tau_sets_how_much_of_the_mix_the_rare_image_must_hold():
    y = torch.tensor([0, 1])  # frequent / rare pair, 10x apart
    assert label_weights(y, 0.3, COUNTS, kappa=3.0, tau=0.5).tolist() == pytest.approx([0.0, 0.3])
    assert label_weights(y, 0.3, COUNTS, kappa=3.0, tau=0.2).tolist() == pytest.approx([0.3, 0.3])
    assert label_weights(y, 0.3, COUNTS, kappa=3.0, tau=0.8).tolist() == pytest.approx([0.0, 1.0])


def test_mixer_applies_the_configured_remix_kappa_and_tau():
    x, y = _batch(), torch.tensor([0, 2, 2, 1])
    mix = {"mixup_alpha": 1.0, "remix_kappa": 3.0, "remix_tau": 0.9}
    rare_only = 0
    for epoch in range(6):
        xm, t = Mixer(mix, COUNTS, 0, epoch)(x, y)
        lam = float(((xm[0] - x[3]) / (x[0] - x[3])).median())  # Mixup: xm[0] = lam x[0] + (1 - lam) x[3]
        assert torch.allclose(t, mix_targets(y, label_weights(y, lam, COUNTS, kappa=3.0, tau=0.9), 3), atol=1e-4)
        rare_only += t[0].tolist() == [0.0, 1.0, 0.0] and t[3].tolist() == [0.0, 1.0, 0.0]
    assert rare_only >= 3  # lam in (0.1, 0.9): both images of the pair carry the rare label alone


def test_negative_alpha_is_refused():
    with pytest.raises(WBCError, match="alphas must be >= 0"):
        build_mixer({"epochs": 5, "mix": {"mixup_alpha": -0.2, "cutmix_alpha": 1.0}}, COUNTS, 0, 0)
