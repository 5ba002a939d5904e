"""Test-time BatchNorm adaptation (`wbc.optional.adapt_bn`) and prediction-only runs (`predict.checkpoints`)."""
import numpy as np
import pytest
import torch
from torch import nn

from helpers import write_folds
from wbc.__main__ import main
from wbc.core.errors import WBCError
from wbc.core.io import load_probs
from wbc.core.run_folder import run_dir
from wbc.models.inference import predict_probs
from wbc.optional.adapt_bn import adapt_batchnorm
from wbc.s3_train.loop import train_fold

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
KW = dict(device=torch.device("cpu"), mean=MEAN, std=STD)


def _net(seed=0):
    """BatchNorm straight on the input, so a per-channel gain and offset of the images is exactly what the
    adapted statistics can undo."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(40, 200, (n, 8, 8, 3), dtype=np.uint8)


def _normalised(images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1) * 255) / (torch.tensor(STD).view(1, 3, 1, 1) * 255)


def test_statistics_are_the_splits_own_and_the_source_model_is_untouched():
    net, images = _net(), _images(40)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    adapted = adapt_batchnorm(net, images, 1.0, batch_size=64, **KW)  # one batch: exact statistics
    x = _normalised(images)
    bn = adapted[0]
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, x.var((0, 2, 3), unbiased=True), atol=1e-4)
    assert not adapted.training and not bn.training and bn.momentum == 0.1
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # alpha mixes the source and the split's statistics linearly.
    half = adapt_batchnorm(net, images, 0.5, batch_size=64, **KW)[0]
    assert torch.allclose(half.running_mean, 0.5 * (before["0.running_mean"] + bn.running_mean), atol=1e-6)
    assert torch.allclose(half.running_var, 0.5 * (before["0.running_var"] + bn.running_var), atol=1e-6)


def test_adaptation_undoes_a_lighting_shift():
    """Source statistics fitted on clean images; the target is the same images under a per-channel gain and
    offset (a lighting change). Unadapted, the predictions move; adapted, they are the clean ones again."""
    net, clean = _net(1), _images(64, 1)
    net[-1].weight.data *= 20  # confident outputs, so that a shift shows in the probabilities
    net = adapt_batchnorm(net, clean, 1.0, batch_size=64, **KW)  # "training" statistics = the clean images
    shifted = np.clip(clean.astype(np.float32) * [0.6, 0.8, 0.7] + [50, 10, 30], 0, 255).astype(np.uint8)
    p_clean = predict_probs(net, clean, tta=1, amp="none", **KW)
    p_shift = predict_probs(net, shifted, tta=1, amp="none", **KW)
    p_adapt = predict_probs(adapt_batchnorm(net, shifted, 1.0, batch_size=64, **KW), shifted, tta=1, amp="none",
                            **KW)
    gap_raw, gap_adapt = np.abs(p_shift - p_clean).max(), np.abs(p_adapt - p_clean).max()
    assert gap_raw > 0.05 and gap_adapt < 0.1 * gap_raw  # what is left is uint8 rounding


def test_batches_average_and_do_not_depend_on_order():
    net, images = _net(2), _images(48, 2)  # three equal batches of 16
    a = adapt_batchnorm(net, images, 1.0, batch_size=16, seed=0, **KW)[0]
    b = adapt_batchnorm(net, images, 1.0, batch_size=16, seed=1, **KW)[0]
    exact = _normalised(images).mean((0, 2, 3))  # equal batches: the mean of batch means is the mean
    assert torch.allclose(a.running_mean, exact, atol=1e-4) and torch.allclose(b.running_mean, exact, atol=1e-4)


def test_refusals():
    with pytest.raises(WBCError, match="no BatchNorm"):
        adapt_batchnorm(nn.Sequential(nn.Conv2d(3, 2, 1), nn.LayerNorm([2, 8, 8])), _images(4), 1.0, **KW)
    with pytest.raises(WBCError, match=r"\(0, 1\]"):
        adapt_batchnorm(_net(), _images(4), 1.5, **KW)
    with pytest.raises(WBCError, match="1 image"):
        adapt_batchnorm(_net(), _images(1), 1.0, **KW)


@pytest.mark.slow
def test_prediction_only_run_uses_the_source_checkpoints(sample_root, make_cfg, monkeypatch):
    """`predict.checkpoints` + `predict.adapt_bn`: a new run folder of adapted predictions from another run's
    fold models; alpha 0 reproduces the source run's predictions exactly. A killed prediction is redone."""
    cfg = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=1", "predict.tta=1")
    write_folds(cfg)
    train_fold(cfg, 0)
    base = [f"data.root={cfg['data']['root']}", f"output_dir={cfg['output_dir']}",
            f"data.cache_dir={cfg['data']['cache_dir']}", f"folds.file={cfg['folds']['file']}", "folds.n_folds=2",
            "train.epochs=1", "predict.tta=1"]
    cmd = ["predict", "-c", "configs/recipes/tiny_cpu.yaml", *base]
    assert main(cmd) == 0
    src = run_dir(cfg)
    assert main(cmd + ["name=same", f"predict.checkpoints={src}"]) == 0
    assert main(cmd + ["name=adapted", f"predict.checkpoints={src}", "predict.adapt_bn=1"]) == 0
    out = src.parent
    assert not (out / "same" / "fold0" / "best.pt").exists() and (out / "adapted" / "config.yaml").exists()
    for split in ("oof", "eval", "test"):
        ref = load_probs(src / f"{split}.csv")
        same = load_probs(out / "same" / f"{split}.csv").align(ref.ids)
        adapted = load_probs(out / "adapted" / f"{split}.csv").align(ref.ids)
        assert np.allclose(same.probs, ref.probs, atol=1e-6)
        assert np.abs(adapted.probs - ref.probs).max() > 1e-3, split
    assert main(cmd + ["name=none", f"predict.checkpoints={out / 'missing'}"]) == 2  # no fold checkpoints
    assert not (out / "none").exists()
    assert main(["train-fold", "--fold", "0", "-c", "configs/recipes/tiny_cpu.yaml", *base, "name=retrain",
                 f"predict.checkpoints={src}"]) == 2  # a prediction-only config does not train

    # Killed while predicting the test split: no oof.csv (the mark of a finished fold), so a rerun redoes it.
    import wbc.s4_predict.fold as fold_mod

    real = fold_mod.predict_probs

    def dies_on_test(model, images, desc="", **kw):
        if desc == "test":
            raise KeyboardInterrupt
        return real(model, images, desc=desc, **kw)

    monkeypatch.setattr(fold_mod, "predict_probs", dies_on_test)
    with pytest.raises(KeyboardInterrupt):
        main(cmd + ["name=killed", f"predict.checkpoints={src}"])
    assert not any((out / "killed" / "fold0" / f).exists() for f in ("eval.csv", "oof.csv"))  # written together
    monkeypatch.setattr(fold_mod, "predict_probs", real)
    assert main(cmd + ["name=killed", f"predict.checkpoints={src}"]) == 0
    for split in ("oof", "test"):
        same = load_probs(out / "same" / f"{split}.csv")
        assert np.allclose(load_probs(out / "killed" / f"{split}.csv").align(same.ids).probs, same.probs)


def test_batches_are_shuffled_so_that_each_sees_the_whole_split():
    """Two halves of very different brightness: batches cut from the unshuffled split would each see one half,
    and the average of their variances would miss the gap between the halves."""
    net = _net(3)
    images = np.concatenate([_images(32, 3) // 2, _images(32, 4) // 2 + 128])
    bn = adapt_batchnorm(net, images, 1.0, batch_size=32, **KW)[0]
    assert torch.allclose(bn.running_var, _normalised(images).var((0, 2, 3)), rtol=0.15)


def test_alpha_zero_is_refused_not_silently_a_copy():
    with pytest.raises(WBCError, match=r"\(0, 1\]"):
        adapt_batchnorm(_net(), _images(4), 0.0, **KW)  # 0 means off: the caller skips adaptation


def test_balancing_weights_give_the_predicted_classes_the_target_mix_with_a_cap():
    from wbc.optional.adapt_bn import MAX_WEIGHT, balancing_weights

    pseudo = np.array([0] * 90 + [1] * 10)
    w = balancing_weights(pseudo, np.array([0.5, 0.5]))
    assert np.isclose(w.sum(), 1) and np.isclose(w[pseudo == 0].sum(), 0.5) and np.isclose(w[pseudo == 1].sum(), 0.5)
    pseudo = np.array([0] * 999 + [1])  # one image of class 1 may not stand for half the split
    w = balancing_weights(pseudo, np.array([0.5, 0.5]))
    assert np.isclose(w[-1] / w[0], MAX_WEIGHT)
    w = balancing_weights(np.array([0, 0, 2]), np.array([0.2, 0.5, 0.3]))  # a class never predicted: no weight
    assert np.allclose(w, [0.2, 0.2, 0.6])  # classes 0 : 2 as 0.2 : 0.3


def _class_net():
    """Class = brightness: BatchNorm on the input, then a linear read-out of the mean level (bright images are
    class 1). The first BatchNorm's running mean is the mean level the statistics were averaged over."""
    net = nn.Sequential(nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        net[-1].weight.copy_(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]) * 10)
        net[-1].bias.zero_()
    return net


def test_the_guard_averages_statistics_over_the_training_class_mix():
    """A split of 90 dark (class 0) and 10 bright (class 1) images, a model trained on batches half and half: plain
    adaptation centres on the 90/10 mix, the guard on the 50/50 one it trained with."""
    from wbc.optional.adapt_bn import adapt

    rng = np.random.default_rng(0)
    dark = rng.integers(60, 70, (90, 8, 8, 3), dtype=np.uint8)
    bright = rng.integers(180, 190, (10, 8, 8, 3), dtype=np.uint8)
    images = np.concatenate([dark, bright])
    x = _normalised(images).mean((2, 3))[:, 0]
    cfg = {"predict": {"adapt_bn": 1.0, "adapt_bn_guard": "none"}}
    kw = dict(KW, batch_size=256, amp="none", tta=1)
    plain = adapt(_class_net(), images, cfg, 0, "t", prior=np.array([1.0, 1.0]), **kw)
    assert plain[0].running_mean[0].item() == pytest.approx(x.mean().item(), abs=1e-4)
    cfg["predict"]["adapt_bn_guard"] = "balance"
    guarded = adapt(_class_net(), images, cfg, 0, "t", prior=np.array([1.0, 1.0]), **kw)
    half = 0.5 * (x[:90].mean() + x[90:].mean()).item()
    assert guarded[0].running_mean[0].item() == pytest.approx(half, abs=0.02)
    assert abs(plain[0].running_mean[0].item() - half) > 0.5


def test_the_training_class_mix_follows_the_sampler():
    import pandas as pd

    from wbc.s3_train.sampling import sampled_class_mix
    from wbc.s4_predict.fold import training_mix

    labels = np.array([0] * 100 + [1] * 4)
    assert np.allclose(sampled_class_mix(labels, 2, {"type": "sqrt"}), [10 / 12, 2 / 12])
    assert np.allclose(sampled_class_mix(labels, 2, {"type": "balanced"}), [0.5, 0.5])
    assert np.allclose(sampled_class_mix(labels, 2, {"type": "none"}), [100 / 104, 4 / 104])
    pool = pd.DataFrame({"labels": ["A"] * 100 + ["B"] * 4 + ["B"] * 50, "fold": [0] * 104 + [1] * 50})
    cfg = {"train": {"sampler": {"type": "none"}}}
    assert np.allclose(training_mix(cfg, pool, 1, ["B", "A"]), [4 / 104, 100 / 104])  # fold 1's rows are held out


def test_colour_views_average_the_image_its_grey_level_and_two_gammas():
    from wbc.models.inference import COLOR_VIEWS, color_view

    net = _net(2)
    images = _images(6, 2)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    grey = color_view(x, COLOR_VIEWS.index("grey"))
    assert torch.allclose(grey[:, 0], grey[:, 2]) and torch.allclose(
        grey[:, 0], 0.299 * x[:, 0].float() + 0.587 * x[:, 1].float() + 0.114 * x[:, 2].float(), atol=1e-4)
    dark = color_view(x, COLOR_VIEWS.index("gamma_1.25"))
    assert torch.allclose(dark, 255 * (x.float() / 255) ** 1.25) and (dark <= x.float() + 1e-4).all()
    both = predict_probs(net, images, color_tta=2, **KW)
    with torch.no_grad():
        want = [net((color_view(x, c).float() - torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
                    / (torch.tensor(STD).view(1, 3, 1, 1) * 255)).softmax(1) for c in (0, 1)]
    assert np.allclose(both, ((want[0] + want[1]) / 2).numpy(), atol=1e-5)
    assert not np.allclose(both, predict_probs(net, images, **KW), atol=1e-3)
    with pytest.raises(ValueError, match="color_tta must be 1, 2 or 4"):
        predict_probs(net, images, color_tta=3, **KW)


def test_a_fold_predicted_with_other_colour_views_or_guard_is_predicted_again(tmp_path):
    import json

    from wbc.core.config import load_config
    from wbc.s4_predict.fold import prediction_settings, predictions_current

    cfg = load_config(None, ["data.root=data/sample"])
    (tmp_path / "oof.csv").write_text("ID\n")
    (tmp_path / "prediction.json").write_text(json.dumps(prediction_settings(cfg)))
    assert predictions_current(cfg, tmp_path)
    cfg["predict"]["color_tta"] = 4
    assert not predictions_current(cfg, tmp_path)
    (tmp_path / "prediction.json").write_text(json.dumps(prediction_settings(cfg)))
    assert predictions_current(cfg, tmp_path)
    cfg["predict"].update(color_tta=1, adapt_bn=0.5)
    old = {**prediction_settings(cfg)}
    old.pop("adapt_bn_guard")  # a fold adapted before the guard existed
    (tmp_path / "prediction.json").write_text(json.dumps(old))
    assert not predictions_current(cfg, tmp_path)
    cfg["predict"]["adapt_bn_guard"] = "none"
    assert predictions_current(cfg, tmp_path)
