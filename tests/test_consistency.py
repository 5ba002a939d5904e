"""Damage-consistency training (AugMix-style): the Jensen-Shannon term, the multi-view dataset, the loop."""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from helpers import write_folds
from wbc.core.config import CONFIG_DIR, load_config
from wbc.core.errors import WBCError
from wbc.optional.consistency import DamageViews, js_consistency
from wbc.s1_data.augment import build_transform
from wbc.s1_data.dataset import CellDataset
from wbc.s3_train.loop import train_fold


def test_js_consistency_is_the_jensen_shannon_divergence():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 5, generator=g) * 2
    p = logits.softmax(-1).numpy().astype(np.float64)
    # scipy returns the JS distance (the square root) in nats.
    expected = np.mean([jensenshannon(p[i, 0], p[i, 1]) ** 2 for i in range(4)])
    assert js_consistency(logits).item() == pytest.approx(expected, rel=1e-4)
    assert js_consistency(logits[:, :1].repeat(1, 3, 1)).item() == pytest.approx(0.0, abs=1e-7)
    # Three views: the mean KL to the mixture, by hand.
    l3 = torch.randn(3, 3, 4, generator=g)
    q = l3.softmax(-1).double()
    m = q.mean(1, keepdim=True)
    assert js_consistency(l3).item() == pytest.approx((q * (q / m).log()).sum(-1).mean().item(), rel=1e-4)


def _views_cfg(*overrides):
    # Always-on flips, nothing else random but the damage: view 0 (damage at a negligible chance) is the
    # flipped image itself, so the other views' difference from it is their damage alone.
    return load_config(CONFIG_DIR / "recipes/tiny_cpu.yaml", [
        "augment.flip=1.0", "augment.rot90=0", "augment.affine.p=0", "augment.color.p=0", "augment.damage.p=1.0e-9",
        *overrides])


def test_damage_views_share_geometry_and_draw_fresh_damage():
    img = np.random.default_rng(0).integers(30, 220, (48, 48, 3), dtype=np.uint8)
    t = DamageViews(_views_cfg(), 3)
    v = t(img, 7)
    assert v.shape == (3, 48, 48, 3) and v.dtype == np.uint8
    assert np.array_equal(v[0], img[::-1, ::-1])                      # geometry only: both flips
    d1, d2 = (np.abs(v[k].astype(int) - v[0]).mean() for k in (1, 2))
    assert d1 > 1 and d2 > 1 and not np.array_equal(v[1], v[2])    # two different damage draws
    assert np.array_equal(t(img, 7), v) and not np.array_equal(t(img, 8)[1], v[1])  # seeded
    # Through the dataset: (V, C, H, W) uint8 per sample, seeded by (seed, epoch, index).
    ds = CellDataset(img[None], [0], t, seed=3)
    x, _ = ds[(0, 0)]
    assert x.shape == (3, 3, 48, 48) and torch.equal(x, ds[(0, 0)][0]) and not torch.equal(x, ds[(1, 0)][0])
    with pytest.raises(WBCError, match="damage"):
        DamageViews(_views_cfg("augment.damage.p=0"), 3)
    with pytest.raises(WBCError, match=">= 2"):
        DamageViews(_views_cfg(), 1)
    # The single-view pipeline is untouched: a Compose, seeded by the dataset as before.
    assert callable(build_transform(_views_cfg(), True).set_random_seed)


def test_training_step_adds_the_js_term_to_the_view_zero_loss():
    """`train_epoch` on a (B, V, C, H, W) batch: the recipe's loss on view 0 + weight x JS over the views,
    with every view in one forward pass (lr 0, so the returned loss is the batch's)."""
    from torch import nn
    from torch.nn import functional as F

    from wbc.models.inference import normalize
    from wbc.optional.consistency import ConsistencyRule
    from wbc.s3_train.step import StepContext, train_epoch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (6, 3, 3, 8, 8), dtype=np.uint8))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ce = lambda logits, target: F.cross_entropy(logits, target)  # noqa: E731

    def step(batch, weight):
        ctx = StepContext(model, model, None, opt, sched, scaler, ce, torch.device("cpu"), norm, "none", False, 0.0, 1,
                          ConsistencyRule(weight))
        ep = train_epoch(ctx, [(batch, y)], 1, "test")
        return ep["loss"], ep["n"]

    model.train()
    logits = model(normalize(x.flatten(0, 1), norm["mean"], norm["std"])).view(6, 3, -1)
    expected = F.cross_entropy(logits[:, 0], y) + 5.0 * js_consistency(logits)
    loss, n = step(x, 5.0)
    assert n == 6 and loss == pytest.approx(expected.item(), rel=1e-5)
    assert js_consistency(logits).item() > 1e-4  # the term is really there
    # A plain (B, C, H, W) batch: the recipe's loss alone.
    plain, _ = step(x[:, 0], 5.0)
    assert plain == pytest.approx(F.cross_entropy(model(normalize(x[:, 0], norm["mean"], norm["std"])), y).item(),
                                  rel=1e-5)


@pytest.mark.slow
def test_consistency_run_trains_and_resumes_exactly(sample_root, make_cfg):
    """A consistency run end to end (2 views): finite losses, and a resumed run repeats the uninterrupted one."""
    cfg = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=2", "train.consistency.weight=6.0",
                   "train.consistency.views=2")
    write_folds(cfg)
    full = [h["train_loss"] for h in train_fold(cfg, 0)["history"]]
    assert len(full) == 2 and all(np.isfinite(full))
    plain = make_cfg(sample_root, "name=plain", "folds.n_folds=2", "train.epochs=2")
    assert [h["train_loss"] for h in train_fold(plain, 0)["history"]] != full
    short = make_cfg(sample_root, "name=resumed", "folds.n_folds=2", "train.epochs=2", "train.consistency.weight=6.0",
                     "train.consistency.views=2")

    def kill(epoch, rec):
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold(short, 0, on_epoch=kill)
    assert [h["train_loss"] for h in train_fold(short, 0, resume=True)["history"]] == full
