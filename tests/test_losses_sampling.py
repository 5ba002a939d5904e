"""Long-tail losses against hand computations; class-rebalancing sampler laws and reproducibility."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wbc.core.errors import WBCError
from wbc.s3_train.losses import build_loss, class_weights, lineage_rows, log_prior
from wbc.s3_train.sampling import build_sampler, class_sampling_weights

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]])
TARGET = torch.tensor([0, 2, 1])
COUNTS = np.array([60, 30, 10])


def _loss(**cfg):
    return build_loss({"label_smoothing": 0.0, **cfg}, COUNTS)


def _log_softmax_rows(logits):
    return [[z - math.log(sum(math.exp(v) for v in row)) for z in row] for row in logits.tolist()]


def test_ce_matches_hand_computation():
    logp = _log_softmax_rows(LOGITS)
    hand = -sum(logp[i][y] for i, y in enumerate(TARGET.tolist())) / 3
    assert _loss(type="ce")(LOGITS, TARGET).item() == pytest.approx(hand, rel=1e-6)

    eps = 0.1  # smoothed target: (1 - eps) on the label, eps / C spread over every class
    hand_ls = sum(-(1 - eps) * logp[i][y] - eps / 3 * sum(logp[i]) for i, y in enumerate(TARGET.tolist())) / 3
    assert _loss(type="ce", label_smoothing=eps)(LOGITS, TARGET).item() == pytest.approx(hand_ls, rel=1e-6)


def test_weighted_smoothed_ce_matches_torch():
    loss = _loss(type="ce", label_smoothing=0.1, class_weight="inverse", class_weight_power=1.0)
    w = torch.tensor(class_weights(COUNTS, "inverse", power=1.0), dtype=torch.float32)
    ref = F.cross_entropy(LOGITS, TARGET, weight=w, label_smoothing=0.1)
    assert loss(LOGITS, TARGET).item() == pytest.approx(ref.item(), rel=1e-5)


def test_focal_matches_hand_computation():
    gamma = 2.0
    alpha = class_weights(COUNTS, "inverse", power=0.5)
    logp = _log_softmax_rows(LOGITS)
    terms = [-alpha[y] * (1 - math.exp(logp[i][y])) ** gamma * logp[i][y] for i, y in enumerate(TARGET.tolist())]
    hand = sum(terms) / sum(alpha[y] for y in TARGET.tolist())
    loss = _loss(type="focal", focal_gamma=gamma, class_weight="inverse", class_weight_power=0.5)
    assert loss(LOGITS, TARGET).item() == pytest.approx(hand, rel=1e-5)
    # gamma = 0 is plain cross-entropy
    assert _loss(type="focal", focal_gamma=0.0)(LOGITS, TARGET).item() == pytest.approx(
        F.cross_entropy(LOGITS, TARGET).item(), rel=1e-6)


def test_balanced_softmax_is_ce_on_logits_plus_log_prior():
    prior = torch.log(torch.tensor(COUNTS / COUNTS.sum(), dtype=torch.float32))
    ref = F.cross_entropy(LOGITS + prior, TARGET)
    assert _loss(type="balanced_softmax")(LOGITS, TARGET).item() == pytest.approx(ref.item(), rel=1e-6)
    assert ref.item() != pytest.approx(F.cross_entropy(LOGITS, TARGET).item(), rel=1e-3)


def test_logit_adjusted_scales_the_prior_by_tau():
    prior = torch.tensor(log_prior(COUNTS), dtype=torch.float32)
    ref = F.cross_entropy(LOGITS + 0.5 * prior, TARGET)
    assert _loss(type="logit_adjusted", tau=0.5)(LOGITS, TARGET).item() == pytest.approx(ref.item(), rel=1e-6)


def test_soft_targets_mix_the_hard_losses():
    loss = _loss(type="ce")
    other = torch.tensor([1, 1, 0])
    lam = 0.7
    soft = lam * F.one_hot(TARGET, 3).float() + (1 - lam) * F.one_hot(other, 3).float()
    expected = lam * loss(LOGITS, TARGET) + (1 - lam) * loss(LOGITS, other)
    assert loss(LOGITS, soft).item() == pytest.approx(expected.item(), rel=1e-6)


def test_class_weight_values():
    np.testing.assert_allclose(class_weights([1, 2, 4], "inverse", power=1.0), [12 / 7, 6 / 7, 3 / 7])
    np.testing.assert_allclose(class_weights([1, 4, 16], "inverse", power=0.5), [12 / 7, 6 / 7, 3 / 7])
    # effective numbers (1 - 0.5^n) / 0.5 = 1, 1.5, 1.75 -> weights 1, 2/3, 4/7, scaled to mean 1
    inv = np.array([1, 2 / 3, 4 / 7])
    np.testing.assert_allclose(class_weights([1, 2, 3], "effective", beta=0.5), inv / inv.mean())
    np.testing.assert_allclose(class_weights([5, 0, 7], "none"), [1, 1, 1])
    assert np.isfinite(class_weights([5, 0, 7], "inverse")).all()  # an absent class gets no infinite weight
    with pytest.raises(WBCError, match="class_weight"):
        class_weights([1, 2], "bogus")
    with pytest.raises(WBCError, match="train.loss.type"):
        build_loss({"type": "bogus"}, COUNTS)


LABELS = np.repeat(np.arange(4), [900, 90, 9, 1])  # 900:1 long tail


@pytest.mark.parametrize("kind, mass", [
    ("none", [900, 90, 9, 1]),
    ("sqrt", [30, 90 ** 0.5, 3, 1]),
    ("power", [900 ** 0.25, 90 ** 0.25, 9 ** 0.25, 1]),
    ("balanced", [1, 1, 1, 1]),
    ("effective", [(1 - 0.99 ** n) / 0.01 for n in (900, 90, 9, 1)]),
])
def test_class_mass_follows_the_law(kind, mass):
    w = class_sampling_weights(LABELS, 4, kind, power=0.25, beta=0.99)
    per_class = np.bincount(LABELS, weights=w, minlength=4)
    np.testing.assert_allclose(per_class, np.array(mass) / np.sum(mass), rtol=1e-9)
    # uniform within a class
    assert np.ptp(w[LABELS == 0]) == 0


def test_sampler_draws_match_the_target_distribution():
    sampler = build_sampler(LABELS, 4, {"type": "sqrt"}, num_samples=100_000, seed=3)
    freq = np.bincount(LABELS[np.fromiter(sampler, int)], minlength=4) / 100_000
    target = np.array([30, 90 ** 0.5, 3, 1]) / (34 + 90 ** 0.5)
    np.testing.assert_allclose(freq, target, atol=0.005)


def test_sampler_is_a_function_of_seed_and_epoch():
    assert build_sampler(LABELS, 4, {"type": "none"}) is None
    a = build_sampler(LABELS, 4, {"type": "balanced"}, seed=7)
    assert len(a) == len(LABELS) and len(list(a)) == len(LABELS)  # one epoch = the dataset length
    epochs = []
    for epoch in range(3):
        a.set_epoch(epoch)
        epochs.append(list(a))
    assert epochs[0] != epochs[1] != epochs[2]
    assert list(a) == epochs[2]  # re-iterating an epoch repeats it

    resumed = build_sampler(LABELS, 4, {"type": "balanced"}, seed=7)
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]
    other_seed = build_sampler(LABELS, 4, {"type": "balanced"}, seed=8)
    other_seed.set_epoch(2)
    assert list(other_seed) != epochs[2]


def test_sampler_rejects_bad_labels():
    with pytest.raises(WBCError, match=r"\[0, 4\)"):
        class_sampling_weights(np.array([0, 1, 4]), 4, "sqrt")
    with pytest.raises(WBCError, match="sampler type"):
        class_sampling_weights(LABELS, 4, "bogus")


LT_COUNTS = np.array([1000, 300, 100, 30, 10])


@pytest.mark.parametrize("train, exponent", [
    ({"sampler": {"type": "none"}, "loss": {"type": "ce", "label_smoothing": 0.0}}, 0.0),
    ({"sampler": {"type": "sqrt"}, "loss": {"type": "logit_adjusted", "tau": 0.5, "label_smoothing": 0.0}}, 1.0),
    ({"sampler": {"type": "power", "power": 0.25},
      "loss": {"type": "ce", "class_weight": "inverse", "class_weight_power": 0.25, "label_smoothing": 0.0}}, 1.0),
    ({"sampler": {"type": "balanced"}, "loss": {"type": "balanced_softmax", "label_smoothing": 0.0}}, 2.0),
])
def test_prior_correction_exponent_is_what_the_loss_optimum_learns(train, exponent):
    """The population optimum of the recipe's loss (its sampler's class mix as a soft target) has
    softmax(logits) ~ prior^(1 - a): the reported exponent a is the one training really applies."""
    from wbc.s3_train.prior_correction import prior_correction

    got = prior_correction(train, LT_COUNTS)
    assert got["total"] == pytest.approx(exponent, abs=1e-6)
    labels = np.repeat(np.arange(len(LT_COUNTS)), LT_COUNTS)
    w = class_sampling_weights(labels, len(LT_COUNTS), train["sampler"]["type"],
                               power=train["sampler"].get("power", 0.5))
    mix = torch.tensor(np.bincount(labels, weights=w), dtype=torch.float32)  # the class mix a batch sees
    loss_fn = build_loss(train["loss"], LT_COUNTS)
    logits = torch.zeros(1, len(LT_COUNTS), requires_grad=True)
    opt = torch.optim.LBFGS([logits], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(logits, mix[None])
        loss.backward()
        return loss

    opt.step(closure)
    learned = F.log_softmax(logits.detach()[0], 0).numpy()
    prior = np.log(LT_COUNTS / LT_COUNTS.sum())
    slope = np.polyfit(prior, learned, 1)[0]
    assert slope == pytest.approx(1 - exponent, abs=1e-3)


def test_prior_correction_stage2_and_effective_law():
    from wbc.s3_train.prior_correction import prior_correction, report_prior_correction

    cfg = {"sampler": {"type": "sqrt"}, "loss": {"type": "logit_adjusted", "tau": 0.5},
           "stage2": {"epochs": 2, "sampler": "balanced"}}
    assert prior_correction(cfg, LT_COUNTS, stage=2) == {"sampler": pytest.approx(1.0), "class_weights": 0.0,
                                                      "loss_offset": 0.0, "total": pytest.approx(1.0)}
    assert set(report_prior_correction(cfg, LT_COUNTS)) == {"stage1", "stage2"}
    eff = prior_correction({"sampler": {"type": "effective", "beta": 0.99}, "loss": {}}, LT_COUNTS)["total"]
    assert 0.3 < eff < 1.0  # natural for the rarest classes, capped for the head: a partial correction


def test_prior_correction_stage2_sampler_and_over_correction_warning(capsys):
    from wbc.s3_train.prior_correction import prior_correction, report_prior_correction

    assert prior_correction({"stage2": {"sampler": "sqrt"}}, LT_COUNTS, stage=2)["total"] == pytest.approx(0.5)
    over = {"sampler": {"type": "balanced"}, "loss": {"type": "balanced_softmax"}}
    assert set(report_prior_correction(over, LT_COUNTS)) == {"stage1"}  # no stage 2 configured
    out = capsys.readouterr().out
    assert "stage1 class-prior correction 2.00" in out and "more than balanced" in out
    report_prior_correction({"sampler": {"type": "sqrt"}, "loss": {"type": "ce"}, "stage2": {"epochs": 0}}, LT_COUNTS)
    out = capsys.readouterr().out
    assert "stage1 class-prior correction 0.50" in out and "more than balanced" not in out and "stage2" not in out


LINEAGE = ["PMY", "MY", "MMY", "BNE", "SNE"]
CODES = ["BA", "BNE", "EO", "MMY", "MY", "PMY", "SNE"]


def test_lineage_smoothing_puts_its_share_on_the_adjacent_stages():
    eps, share = 0.1, 0.5
    rows = lineage_rows(CODES, LINEAGE, share)
    assert np.allclose(rows.sum(1), 1.0)
    i = CODES.index
    assert rows[i("BA")] == pytest.approx(np.full(7, 1 / 7))  # outside the lineage: uniform
    # BNE's neighbours are MMY and SNE: a quarter each, the other half spread uniformly
    assert rows[i("BNE"), i("SNE")] == pytest.approx(0.25 + 0.5 / 7)
    assert rows[i("BNE"), i("MMY")] == pytest.approx(0.25 + 0.5 / 7)
    assert rows[i("BNE"), i("BA")] == pytest.approx(0.5 / 7)
    assert rows[i("SNE"), i("BNE")] == pytest.approx(0.5 + 0.5 / 7)  # an end of the lineage: one neighbour
    z, y = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 6, 0, 5, 3])
    loss = build_loss({"type": "ce", "label_smoothing": eps, "lineage": LINEAGE, "lineage_share": share}, [10] * 7,
                      CODES)
    q = (1 - eps) * F.one_hot(y, 7).float() + eps * torch.as_tensor(rows, dtype=torch.float32)[y]
    assert loss(z, y).item() == pytest.approx((-(q * F.log_softmax(z, 1)).sum(1)).mean().item(), rel=1e-6)
    plain = build_loss({"type": "ce", "label_smoothing": eps}, [10] * 7, CODES)
    assert plain.smoothing is None  # off: the uniform formula, so runs without it repeat bit for bit
    assert loss(z, y).item() != pytest.approx(plain(z, y).item(), rel=1e-4)


def test_lineage_smoothing_follows_a_specialists_classes_and_refuses_bad_lists():
    rows = lineage_rows(["BNE", "MY", "SNE"], LINEAGE, 1.0)  # a specialist on three of the five stages
    assert rows[2] == pytest.approx([1.0, 0.0, 0.0])  # SNE's one neighbour in the subset is BNE
    assert rows[1] == pytest.approx([1.0, 0.0, 0.0])  # MY's neighbours PMY and MMY are absent: BNE is next
    assert lineage_rows(CODES, None, 0.5) is None
    with pytest.raises(WBCError, match="distinct class codes"):
        lineage_rows(CODES, ["MY", "MY"], 0.5)
    with pytest.raises(WBCError, match="lineage_share must be in"):
        lineage_rows(CODES, LINEAGE, 1.5)
    with pytest.raises(WBCError, match="needs the model's class names"):
        build_loss({"type": "ce", "lineage": LINEAGE}, [10] * 7)
