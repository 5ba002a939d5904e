"""Embeddings: SigLIP / SupCon losses, balanced sampler, classifiers, MedSigLIP loader, few-shot, end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from helpers import kill_at_save, write_folds
from wbc.core.errors import WBCError
from wbc.optional.embed.classifiers import (
    HierarchicalClassifier,
    KNNClassifier,
    PrototypeClassifier,
    SklearnClassifier,
    build_classifier,
)
from wbc.optional.embed.fewshot import mean_ci, run_episodes, sample_episode, subsample_per_class
from wbc.optional.embed.losses import SigLIPLoss, SupConLoss
from wbc.optional.embed.sampler import ClassBalancedBatchSampler


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def blobs(n_per_class=(30, 20, 10, 5), dim=16, noise=0.15, seed=0):
    """Separable clusters around random unit directions."""
    centres = np.linalg.qr(np.random.default_rng(123).normal(size=(dim, dim)))[0][: len(n_per_class)]
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    x = centres[y] + noise * rng.normal(size=(len(y), dim)) / np.sqrt(dim)
    return x.astype(np.float32), y


# ---- losses -------------------------------------------------------------------------------------------

def test_siglip_loss_equals_hand_computation():
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    y = torch.tensor([0, 0, 1])
    loss = SigLIPLoss(dim=2, pairwise=True, class_embeddings=False)
    assert float(loss.logit_scale) == pytest.approx(math.log(10)) and float(loss.logit_bias) == -10.0
    zz = z.tolist()
    total = 0.0
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            cos = sum(a * b for a, b in zip(zz[i], zz[j]))
            sign = 1 if y[i] == y[j] else -1
            total += -_log_sigmoid(sign * (10.0 * cos - 10.0))
    assert float(loss(z, y)) == pytest.approx(total / 3, rel=1e-6)
    # pairs (0,1): cos 0.6 -> logit -4, positive; (0,2) cos 0, (1,2) cos 0.8, negatives
    expected = 2 * (-_log_sigmoid(-4.0)) + 2 * (-_log_sigmoid(10.0)) + 2 * (-_log_sigmoid(2.0))
    assert float(loss(z, y)) == pytest.approx(expected / 3, rel=1e-6)


def test_siglip_class_term_equals_hand_computation():
    loss = SigLIPLoss(dim=2, n_classes=2, pairwise=False, class_embeddings=True)
    with torch.no_grad():
        loss.class_emb.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # normalised inside: e0, e1
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    y = torch.tensor([0, 1])
    # image 0: own class cos 1 -> +0, other cos 0 -> -10; image 1: own cos .8 -> -2, other cos .6 -> -4
    expected = (-_log_sigmoid(0.0) - _log_sigmoid(10.0) - _log_sigmoid(-2.0) - _log_sigmoid(4.0)) / 2
    assert float(loss(z, y)) == pytest.approx(expected, rel=1e-6)
    both = SigLIPLoss(dim=2, n_classes=2, pairwise=True, class_embeddings=True)
    assert {n for n, _ in both.named_parameters()} == {"logit_scale", "logit_bias", "class_emb",
                                                        "class_logit_scale", "class_logit_bias"}


@pytest.mark.parametrize("make", [lambda: SigLIPLoss(8, 4, class_embeddings=False), lambda: SupConLoss(0.1)])
def test_losses_decrease_when_a_class_is_pulled_together(make):
    torch.manual_seed(0)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    z = F.normalize(torch.randn(10, 8), dim=1)
    loss = make()
    before = float(loss(z, y))
    centre = F.normalize(z[y == 0].mean(0), dim=0)
    pulled = z.clone()
    pulled[y == 0] = F.normalize(0.2 * z[y == 0] + 0.8 * centre, dim=1)
    assert float(loss(pulled, y)) < before - 1e-3
    collapsed = z.clone()  # every class on its own axis: near the minimum
    collapsed[:] = F.one_hot(y, 8).float()
    assert float(loss(collapsed, y)) < float(loss(pulled, y))


def test_supcon_hand_computation_and_no_positive():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    tau = 0.5
    # anchors 0 and 2 each have one positive (cos 1) and one negative (cos 0); anchor 1 has none
    per = -(1 / tau - math.log(math.exp(1 / tau) + math.exp(0.0)))
    assert float(SupConLoss(tau)(z, y)) == pytest.approx(per, rel=1e-6)
    assert float(SupConLoss(tau)(z, torch.tensor([0, 1, 2]))) == 0.0


def test_siglip_class_term_keeps_its_own_temperature_and_bias():
    from wbc.optional.embed.losses import sigmoid_class_loss, sigmoid_pair_loss

    torch.manual_seed(0)
    loss = SigLIPLoss(dim=4, n_classes=3, pairwise=True, class_embeddings=True)
    with torch.no_grad():  # the two terms' t and b set apart: each term must use its own
        loss.class_logit_scale.fill_(0.0)
        loss.class_logit_bias.fill_(1.5)
    z, y = F.normalize(torch.randn(6, 4), dim=1), torch.tensor([0, 0, 1, 1, 2, 2])
    expected = (sigmoid_pair_loss(z, y, torch.tensor(math.log(10)), torch.tensor(-10.0))
                + sigmoid_class_loss(z, y, loss.class_emb, torch.tensor(0.0), torch.tensor(1.5)))
    assert float(loss(z, y)) == pytest.approx(float(expected), rel=1e-6)


def test_build_loss_takes_its_settings_from_the_config():
    from wbc.optional.embed.losses import build_loss

    s = build_loss({"loss": "siglip", "siglip": {"pairwise": True, "class_embeddings": True, "t_init": 1.0,
                                                  "b_init": -3.0}}, 4, 3)
    assert float(s.logit_scale) == 1.0 and float(s.logit_bias) == -3.0
    assert float(s.class_logit_scale) == 1.0 and float(s.class_logit_bias) == -3.0
    assert build_loss({"loss": "supcon", "supcon_temperature": 0.2}, 4, 3).temperature == 0.2
    with pytest.raises(WBCError, match="unknown loss"):
        build_loss({"loss": "triplet"}, 4, 3)


def test_siglip_needs_a_term():
    with pytest.raises(WBCError):
        SigLIPLoss(4, 3, pairwise=False, class_embeddings=False)


# ---- sampler ------------------------------------------------------------------------------------------

def test_balanced_sampler_gives_rare_classes_positives_in_every_batch():
    y = np.array([0] * 100 + [1] * 30 + [2] * 3 + [3] * 1)
    s = ClassBalancedBatchSampler(y, classes_per_batch=2, samples_per_class=4, steps=40, seed=0)
    seen = np.zeros(4, int)
    for batch in s:
        labels = y[batch]
        assert len(batch) == 8
        cls, counts = np.unique(labels, return_counts=True)
        assert len(cls) == 2 and (counts == 4).all()  # P classes x K images, K-1 positives each
        seen[cls] += 1
        for c in cls[cls < 2]:  # frequent classes: without replacement
            assert len(set(np.asarray(batch)[labels == c])) == 4
    assert (seen == 20).all()  # classes are visited in rounds: equally often
    assert len(s) == 40
    assert len(ClassBalancedBatchSampler(y, 4, 4)) == math.ceil(len(y) / 16)
    with pytest.raises(WBCError, match="samples_per_class"):  # K = 1 leaves images without a positive
        ClassBalancedBatchSampler(y, 2, 1)


# ---- classifiers --------------------------------------------------------------------------------------

def test_prototype_classifier_is_exact_on_separable_embeddings():
    x, y = blobs()
    xt, yt = blobs(seed=1)
    for per_class in (False, True):
        clf = PrototypeClassifier(5, temperature=10.0, per_class=per_class).fit(x, y)  # class 4 absent
        p = clf.predict_proba(xt)
        assert p.shape == (len(xt), 5)
        np.testing.assert_allclose(p.sum(1), 1.0)
        assert (p.argmax(1) == yt).all()
        assert (p[:, 4] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(clf.prototypes[:4], axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(clf.temperatures[:4], 10.0)  # fitted per class
    # with T fixed, probabilities are exactly softmax(T * cosine to the normalised class means)
    fixed = PrototypeClassifier(4, temperature=7.0).fit(x, y)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = np.stack([unit[y == c].mean(0) for c in range(4)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    q = xt[:3] / np.linalg.norm(xt[:3], axis=1, keepdims=True)
    expected = torch.softmax(torch.tensor(7.0 * q @ means.T, dtype=torch.float64), 1).numpy()
    np.testing.assert_allclose(fixed.predict_proba(xt[:3]), expected, rtol=1e-5)


def test_per_class_temperatures_are_fitted_leave_one_out():
    # Random embeddings carry no class information: scored leave-one-out, the fitted temperatures fall
    # below the prior (flatter probabilities). Scored in-sample, an image's own prototype would look
    # informative and push them up.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 64)).astype(np.float32), np.repeat(np.arange(4), 10)
    clf = PrototypeClassifier(4, temperature=10.0, per_class=True).fit(x, y)
    assert (clf.temperatures < 6.0).all(), clf.temperatures
    # separable classes: sharper than the prior
    xs, ys = blobs()
    assert (PrototypeClassifier(4, temperature=10.0, per_class=True).fit(xs, ys).temperatures > 10.0).all()


def test_knn_votes_are_weighted_by_similarity():
    bank = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]], np.float32)
    knn = KNNClassifier(2, k=3, temperature=0.5).fit(bank, [0, 1, 1])
    q = np.array([[0.99, 0.141]], np.float32)
    sim = (q / np.linalg.norm(q)) @ bank.T
    w = np.exp(sim[0] / 0.5)
    np.testing.assert_allclose(knn.predict_proba(q)[0], [w[0] / w.sum(), w[1:].sum() / w.sum()], rtol=1e-5)
    assert knn.predict_proba(q)[0, 0] > 0.4  # an unweighted vote would give 1/3


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_linear_classifiers_are_class_balanced(kind):
    # Features without information and a 9:1 class mix: a balanced fit predicts about 1/2 for the rare
    # class on average, an unweighted one about its prior, 1/10.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 4)).astype(np.float32), (np.arange(400) % 10 == 0).astype(int)
    p = SklearnClassifier(2, kind, C=0.01, max_iter=300).fit(x, y).predict_proba(x)
    assert p[:, 1].mean() > 0.3


def test_knn_and_linear_classifiers_on_separable_embeddings():
    x, y = blobs()
    xt, yt = blobs(seed=1)
    for clf in (KNNClassifier(5, k=5), SklearnClassifier(5, "logreg"), SklearnClassifier(5, "mlp", max_iter=300)):
        p = clf.fit(x, y).predict_proba(xt)
        assert p.shape == (len(xt), 5)
        np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
        assert (p.argmax(1) == yt).mean() == 1.0
        assert (p[:, 4] == 0).all()  # a class absent from training keeps its column
    # k-NN votes: one neighbour -> a one-hot probability of the nearest training image's class
    p1 = KNNClassifier(4, k=1).fit(x, y).predict_proba(x[:5])
    np.testing.assert_array_equal(p1, np.eye(4)[y[:5]])


def test_hierarchical_classifier_decides_the_group_then_its_stages():
    # Uninformative features: each level predicts its weighted class mix. Classes 1-3 form the group (10 images
    # each), class 0 is outside (10): the coarse level weights every stage like any class, so the group holds 3/4.
    x, y = np.zeros((40, 4), np.float32), np.repeat([0, 1, 2, 3], 10)
    p = HierarchicalClassifier(5, [1, 2, 3], lambda: SklearnClassifier(5, "logreg")).fit(x, y).predict_proba(x[:1])[0]
    np.testing.assert_allclose(p, [0.25, 0.25, 0.25, 0.25, 0.0], atol=1e-3)
    # Separable stages: the group's mass goes to the right stage, and the outsider class stays itself.
    xb, yb = blobs()
    xt, yt = blobs(seed=1)
    p = HierarchicalClassifier(5, [1, 2, 3], lambda: SklearnClassifier(5, "logreg")).fit(xb, yb).predict_proba(xt)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    assert (p.argmax(1) == yt).mean() == 1.0 and (p[:, 4] == 0).all()
    # A training part with one stage of the group: that stage takes the group's whole mass.
    keep = ~np.isin(yb, [2, 3])
    one = HierarchicalClassifier(5, [1, 2, 3], lambda: SklearnClassifier(5, "logreg")).fit(xb[keep], yb[keep])
    p = one.predict_proba(xt)
    assert (p[:, [2, 3]] == 0).all() and (p.argmax(1)[yt == 1] == 1).all()


def test_hierarchy_names_the_missing_classes():
    e = {"hierarchy": ["PMY", "MY", "MMY"], "linear_C": 1.0}
    assert build_classifier("hier", 3, e, 0, ["LY", "MY", "PMY"]).group == [1, 2]
    with pytest.raises(WBCError, match="fewer than two"):
        build_classifier("hier", 3, e, 0, ["LY", "MY", "SNE"])


# ---- MedSigLIP loader ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_siglip_dir(tmp_path_factory):
    """A randomly initialised SigLIP (vision + text towers, the google/medsiglip-448 layout) saved locally."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    cfg = SiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0))
    torch.manual_seed(0)
    model = SiglipModel(cfg).eval()
    d = tmp_path_factory.mktemp("medsiglip")
    model.save_pretrained(d)
    SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(d)
    return d, model


def test_medsiglip_loader_builds_embeds_and_normalises(tiny_siglip_dir):
    from wbc.models.inference import normalize
    from wbc.optional.embed.encoders import EmbeddingHead, EmbeddingModel, load_medsiglip
    from wbc.optional.embed.train import embed_array

    d, reference = tiny_siglip_dir
    enc = load_medsiglip(d)
    assert enc.feat_dim == 32 and enc.input_size == 32 and enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = normalize(torch.from_numpy(imgs).permute(0, 3, 1, 2), enc.mean, enc.std)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # the processor's (x/255 - .5)/.5
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=x)  # the full model's pooled image output
        expected = getattr(expected, "pooler_output", expected)
    feats = embed_array(enc, imgs, torch.device("cpu"), norm={"mean": enc.mean, "std": enc.std})
    np.testing.assert_allclose(feats, expected.numpy(), rtol=1e-4, atol=1e-5)  # weights really loaded
    # other sizes are resized to the tower's 32 px; a head gives unit-norm embeddings
    big = np.stack([np.kron(im, np.ones((2, 2, 1), np.uint8)) for im in imgs])  # 64 px
    model = EmbeddingModel(enc, EmbeddingHead(enc.feat_dim, 8))
    z = embed_array(model, big, torch.device("cpu"), norm={"mean": enc.mean, "std": enc.std})
    assert z.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def test_medsiglip_loader_rejects_a_folder_without_weights(tmp_path, tiny_siglip_dir):
    from wbc.optional.embed.encoders import load_medsiglip

    with pytest.raises(WBCError, match="config.json"):
        load_medsiglip(tmp_path)
    d, _ = tiny_siglip_dir
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(WBCError):
        load_medsiglip(tmp_path)


def test_medsiglip_loader_takes_the_processors_normalisation_and_refuses_partial_weights(tmp_path, tiny_siglip_dir):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from wbc.optional.embed.encoders import load_medsiglip

    d, _ = tiny_siglip_dir
    for f in d.iterdir():
        shutil.copy(f, tmp_path / f.name)
    pp = json.loads((d / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pp, "image_mean": [0.4, 0.45, 0.5],
                                                                   "image_std": [0.2, 0.25, 0.3]}))
    enc = load_medsiglip(tmp_path)
    assert enc.mean == (0.4, 0.45, 0.5) and enc.std == (0.2, 0.25, 0.3)
    weights = next(tmp_path.glob("*.safetensors"))
    sd = load_file(weights)
    drop = next(k for k in sd if "vision_model" in k and "layers.1." in k)
    save_file({k: v for k, v in sd.items() if k != drop}, weights, metadata={"format": "pt"})
    with pytest.raises(WBCError, match="do not fit the SigLIP vision tower"):
        load_medsiglip(tmp_path)


# ---- few-shot -----------------------------------------------------------------------------------------

def test_episodes_never_leak_queries_into_support():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), [40, 25, 12, 8, 4, 60])
    groups = np.array([f"g{i // 2}" for i in range(len(y))])  # pairs of copies of one original
    for k in (1, 5, 10):
        for _ in range(50):
            ep = sample_episode(y, k, 3, rng, groups=groups)
            assert ep is not None
            assert not set(ep.support) & set(ep.query)
            assert not set(groups[ep.support]) & set(groups[ep.query])  # copies of a support image stay out
            for c in ep.classes:
                assert (y[ep.support] == c).sum() == k and (y[ep.query] == c).sum() == 3
            assert set(y[ep.support]) == set(y[ep.query]) == set(ep.classes)
    assert set(sample_episode(y, 20, 15, rng).classes) == {0, 5}  # only classes with >= 35 images
    assert sample_episode(y, 50, 15, rng) is None  # one class only is no episode
    ep = sample_episode(y, 5, 3, rng, n_way=3)
    assert len(ep.classes) == 3


def test_run_episodes_and_intervals():
    x, y = blobs((40, 40, 40, 40), noise=0.3)
    rows = run_episodes([{"emb": x, "y": y}], [1, 5], episodes=30, n_query=5, seed=0)
    assert [r["k_shot"] for r in rows] == [1, 5]
    for r in rows:
        assert r["episodes"] == 30 and r["n_way"] == 4
        assert r["accuracy"] == 1.0 and r["macro_f1"] == 1.0 and r["accuracy_ci95"] == 0.0
    m, ci = mean_ci([0.5, 0.7, 0.6, 0.8])
    assert m == pytest.approx(0.65) and ci == pytest.approx(1.96 * np.std([0.5, 0.7, 0.6, 0.8], ddof=1) / 2)
    pick = subsample_per_class(np.repeat([0, 1, 2], [100, 50, 3]), 50, rng=np.random.default_rng(0))
    assert np.bincount(np.repeat([0, 1, 2], [100, 50, 3])[pick]).tolist() == [50, 50, 3]


# ---- head training ------------------------------------------------------------------------------------

def test_head_training_on_frozen_features_clusters_classes(tmp_path):
    from wbc.core.io import torch_load
    from wbc.optional.embed.encoders import EmbeddingHead, EmbeddingModel
    from wbc.optional.embed.run import DEFAULTS
    from wbc.optional.embed.train import embed_array, train_embedding

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), [60, 30, 10, 4])
    means = rng.normal(size=(4, 24)) * 0.6
    feats = (means[y] + rng.normal(size=(len(y), 24))).astype(np.float32)
    e = {**DEFAULTS, "epochs": 6, "classes_per_batch": 4, "samples_per_class": 6, "steps_per_epoch": 10,
         "lr": 3e-3, "proj_dim": 8, "hidden_dim": 32}
    torch.manual_seed(0)
    model = EmbeddingModel(None, EmbeddingHead(24, 8, 32))
    loss = SigLIPLoss(8, 4, class_embeddings=True)
    z0 = embed_array(model, feats, torch.device("cpu"))
    hist = train_embedding(model, loss, feats, y, e, torch.device("cpu"), tmp_path, seed=0)
    assert len(hist) == 6 and hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    z = embed_array(model, feats, torch.device("cpu"))
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    acc_before = (PrototypeClassifier(4).fit(z0, y).predict_proba(z0).argmax(1) == y).mean()
    acc_after = (PrototypeClassifier(4).fit(z, y).predict_proba(z).argmax(1) == y).mean()
    assert acc_after > 0.9 and acc_after > acc_before
    sd = torch_load(tmp_path / "embed.pt")  # plain state_dict: model + SigLIP t', b, class embeddings
    assert "loss.logit_scale" in sd and "loss.class_emb" in sd and any(k.startswith("model.head.") for k in sd)
    assert float(sd["loss.logit_scale"]) != pytest.approx(math.log(10), abs=1e-6)  # t is learnt
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6


def test_joint_classification_trains_the_linear_head(tmp_path):
    from wbc.optional.embed.encoders import EmbeddingHead, EmbeddingModel
    from wbc.optional.embed.run import DEFAULTS
    from wbc.optional.embed.train import train_embedding

    x, y = blobs((30, 30, 30, 30), dim=12, noise=0.5)
    e = {**DEFAULTS, "epochs": 4, "classes_per_batch": 4, "samples_per_class": 6, "steps_per_epoch": 10, "lr": 1e-2,
         "proj_dim": 4, "hidden_dim": 0, "ce_weight": 1.0}
    torch.manual_seed(0)
    model = EmbeddingModel(None, EmbeddingHead(12, 4, 0, n_classes=4))
    train_embedding(model, SupConLoss(0.1), x, y, e, torch.device("cpu"), tmp_path, seed=0)
    with torch.no_grad():
        _, logits = model(torch.from_numpy(x))
    assert (logits.argmax(1).numpy() == y).mean() > 0.9


def test_export_averages_dihedral_views_and_renormalises():
    from wbc.models.inference import normalize, view
    from wbc.optional.embed.train import embed_array

    class Corner(torch.nn.Module):  # position-dependent: each dihedral view gives another embedding
        def forward(self, x):
            return F.normalize(x[:, :, :2, :2].flatten(1), dim=-1), None

    imgs = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    z = embed_array(Corner(), imgs, torch.device("cpu"), norm=norm, tta=4)
    x = normalize(torch.from_numpy(imgs).permute(0, 3, 1, 2), norm["mean"], norm["std"])
    expected = F.normalize(sum(Corner()(view(x, k))[0] for k in range(4)) / 4, dim=-1)
    np.testing.assert_allclose(z, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(z, embed_array(Corner(), imgs, torch.device("cpu"), norm=norm, tta=1))


def _fake_embed_run(run, n=40, folds=2):
    """Per-fold embedding files: each row's vector is unique (its index), so a fit can be traced to its rows."""
    from wbc.optional.embed.run import save_embeddings

    ids = np.array([f"{i:04d}" for i in range(n)])
    y = np.arange(n) % 2
    fold = (np.arange(n) // 2) % folds
    labels = np.array(["A", "B"])[y]
    emb = np.stack([np.arange(n), y * 10.0 + 1], 1).astype(np.float32)
    for k in range(folds):
        save_embeddings(run / f"fold{k}" / "embeddings_train.npz", ids, emb + k, labels, np.full(n, ""), fold)
        save_embeddings(run / f"fold{k}" / "embeddings_eval.npz", ["e0", "e1"], [[1, 1], [2, 11]], ["A", "B"], ["", ""])
    return ids, fold


def test_fewshot_draws_fold_k_only_from_images_encoder_k_never_trained_on(tmp_path):
    from wbc.optional.embed.run import fewshot_spaces

    ids, fold = _fake_embed_run(tmp_path)
    spaces, shared = fewshot_spaces(tmp_path, [0, 1], {"A": 0, "B": 1})
    assert not shared and len(spaces) == 2
    for k, sp in enumerate(spaces):
        held = np.flatnonzero(fold == k)
        assert len(sp["emb"]) == len(held) + 2  # fold k's held-out images plus eval
        np.testing.assert_array_equal(sp["emb"][:len(held), 0], held + k)


def test_labels_per_class_fits_on_the_folds_training_part(tmp_path, monkeypatch):
    from wbc.optional.embed import run as embed_run

    ids, fold = _fake_embed_run(tmp_path)
    fitted = []
    real = embed_run.build_classifier

    def spy(name, n, e, seed=0, classes=None):
        clf = real(name, n, e, seed, classes)
        fit = clf.fit
        clf.fit = lambda emb, y: (fitted.append(np.array(emb)), fit(emb, y))[1]
        return clf

    monkeypatch.setattr(embed_run, "build_classifier", spy)
    e = embed_run.with_defaults({"embed": {"classifiers": ["proto"]}})["embed"]
    e["fewshot"] = {**e["fewshot"], "labels_per_class": 5, "repeats": 1, "classifier": "proto"}
    out = embed_run.labels_per_class(tmp_path, [0, 1], {"A": 0, "B": 1}, ["A", "B"], e, seed=0)
    assert len(fitted) == 2 and out["repeats"] == 1
    for k, emb in enumerate(fitted):
        rows = emb[:, 0].astype(int) - k
        assert len(rows) == 10 and (fold[rows] != k).all()  # 5 per class, none from the held-out fold


# ---- end to end ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_embed_resumes_exactly_after_a_kill(sample_root, make_cfg, monkeypatch):
    """Killed while saving fold 0's epoch-1 state, `embed --resume` goes on from epoch 0's state (optimizer,
    schedule, the sampler's draws, RNG) and ends with the weights and embeddings of an uninterrupted run."""
    from wbc.core import checkpoint
    from wbc.core.io import torch_load
    from wbc.optional.embed import run as embed_run

    over = ["folds.n_folds=2", "embed.epochs=3", "embed.steps_per_epoch=2", "embed.classifiers=[proto]",
            "data.image_size=32", "model.drop_path_rate=0.2"]
    full, part = (make_cfg(sample_root, *over, f"name={n}", config="steps/embed_tiny_cpu.yaml")
                  for n in ("full", "part"))
    write_folds(full)
    embed_run.run_embed(full)
    real_save = kill_at_save(monkeypatch, 2, "embed_state.pt")
    with pytest.raises(KeyboardInterrupt):
        embed_run.run_embed(part)
    monkeypatch.setattr(checkpoint, "torch_save", real_save)
    assert torch_load(embed_run.run_dir(part) / "fold0" / "embed_state.pt")["epoch"] == 0
    embed_run.run_embed(part, resume=True)
    for k in (0, 1):
        a, b = (torch_load(embed_run.run_dir(c) / f"fold{k}" / "embed.pt") for c in (full, part))
        assert all(torch.equal(a[n], b[n]) for n in a), k
        ea, eb = (embed_run.load_embeddings(embed_run.run_dir(c), "eval", k)["embeddings"] for c in (full, part))
        np.testing.assert_array_equal(ea, eb)
    losses = [[json.loads(r)["loss"]
               for r in (embed_run.run_dir(c) / "fold0" / "metrics.jsonl").read_text().splitlines()]
              for c in (full, part)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


@pytest.mark.slow
def test_embed_end_to_end_writes_fold_safe_members(sample_root, make_cfg, monkeypatch):
    from wbc.core.io import load_probs
    from wbc.optional.embed import run as embed_run
    from wbc.s2_folds.folds import folds_path

    cfg = make_cfg(sample_root, "folds.n_folds=2", "embed.epochs=1", "embed.steps_per_epoch=2",
                   "embed.classifiers=[proto,knn,logreg,hier]", "name=emb", "data.image_size=32",
                   config="steps/embed_tiny_cpu.yaml")
    write_folds(cfg)
    fits = []
    real = embed_run.build_classifier

    def spy(name, n, e, seed=0, classes=None):
        clf = real(name, n, e, seed, classes)
        fit = clf.fit
        clf.fit = lambda emb, y: (fits.append((name, np.array(emb))), fit(emb, y))[1]
        return clf

    monkeypatch.setattr(embed_run, "build_classifier", spy)
    report = embed_run.run_embed(cfg)
    out = embed_run.run_dir(cfg)
    folds = pd.read_csv(folds_path(cfg))
    assert [name for name, _ in fits] == ["proto", "knn", "logreg", "hier"] * 2  # folds in order
    for i, (_, fitted) in enumerate(fits):  # fold k's classifiers see exactly fold k's training rows
        tr = embed_run.load_embeddings(out, "train", i // 4)
        np.testing.assert_array_equal(fitted, tr["embeddings"][tr["folds"] != i // 4])
    for k in (0, 1):
        tr = embed_run.load_embeddings(out, "train", k)
        assert (out / f"fold{k}" / "embed.pt").is_file()
        assert tr["embeddings"].shape == (len(folds), 32) and tr["embeddings"].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(tr["embeddings"], axis=1), 1.0, rtol=1e-4)
        assert set(tr["ids"]) == set(folds["ID"])
        ids_fold = dict(zip(folds["ID"], folds["fold"]))
        assert all(ids_fold[i] == f for i, f in zip(tr["ids"], tr["folds"]))
    e0, e1 = (embed_run.load_embeddings(out, "eval", k)["embeddings"] for k in (0, 1))
    assert not np.allclose(e0, e1)  # each fold trains its own encoder
    for clf in ("proto", "knn", "logreg", "hier"):
        d = out.parent / f"emb_{clf}"
        oof = load_probs(d / "oof.csv")
        assert sorted(oof.ids) == sorted(folds["ID"]) and oof.folds is not None
        assert dict(zip(oof.ids, oof.folds)) == dict(zip(folds["ID"], folds["fold"]))
        assert (oof.labels != "").all()
        np.testing.assert_allclose(oof.probs.sum(1), 1.0, rtol=1e-6)
        ev, te = load_probs(d / "eval.csv"), load_probs(d / "test.csv")
        assert len(ev.ids) == 80 and (ev.labels != "").all() and len(te.ids) == 120
        assert 0.0 <= report["classifiers"][clf]["oof_macro_f1"] <= 1.0

    cfg_fs = make_cfg(sample_root, "folds.n_folds=2", "name=emb", "data.image_size=32", "embed.fewshot.episodes=20",
                      "embed.fewshot.ks=[1,5]", "embed.fewshot.repeats=2", config="steps/embed_tiny_cpu.yaml")
    fs = embed_run.run_fewshot(cfg_fs)
    assert [r["k_shot"] for r in fs["episodes"]] == [1, 5]
    assert all(r["episodes"] == 20 and r["n_way"] >= 2 for r in fs["episodes"])
    assert 0.0 <= fs["labels_per_class"]["oof_macro_f1"] <= 1.0 and fs["labels_per_class"]["repeats"] == 2
    assert (out / "fewshot.json").is_file()


@pytest.mark.slow
def test_frozen_medsiglip_features_once_head_per_fold_then_raw_shared(sample_root, make_cfg, tiny_siglip_dir,
                                                                    monkeypatch):
    from wbc.core.io import load_probs
    from wbc.optional.embed import encoders
    from wbc.optional.embed import run as embed_run

    d, _ = tiny_siglip_dir
    over = ["folds.n_folds=2", "embed.encoder=medsiglip", f"embed.medsiglip_dir={d}", "embed.classifiers=[proto]",
            "embed.steps_per_epoch=3", "name=msl", "data.image_size=32"]
    cfg = make_cfg(sample_root, *over, "embed.epochs=1", config="steps/embed_tiny_cpu.yaml")
    write_folds(cfg)
    calls = []
    real = encoders.build_encoder
    monkeypatch.setattr(encoders, "build_encoder", lambda c, fold=None: (calls.append(fold), real(c, fold))[1])
    embed_run.run_embed(cfg)
    out = embed_run.run_dir(cfg)
    assert calls == [None]  # one forward pass of the frozen tower serves both folds
    z0, z1 = (embed_run.load_embeddings(out, "test", k)["embeddings"] for k in (0, 1))
    assert z0.shape == (120, 32) and not np.allclose(z0, z1)  # a head per fold on the shared features
    assert not (out / "embeddings_test.npz").exists()

    embed_run.run_embed(make_cfg(sample_root, *over, "embed.epochs=0", config="steps/embed_tiny_cpu.yaml"))
    assert (out / "embeddings_train.npz").is_file() and not (out / "fold0" / "embeddings_train.npz").exists()
    tr = embed_run.load_embeddings(out, "train", 1)  # the shared file, for any fold
    assert tr["embeddings"].shape == (480, 32)  # the tower's pooled features, L2-normalised
    np.testing.assert_allclose(np.linalg.norm(tr["embeddings"], axis=1), 1.0, rtol=1e-5)
    oof = load_probs(out.parent / "msl_proto" / "oof.csv")
    assert sorted(oof.ids) == sorted(tr["ids"])


def test_timm_encoder_loads_a_local_checkpoint(tmp_path):
    from wbc.core.io import torch_save
    from wbc.models.factory import create_model
    from wbc.optional.embed.encoders import build_encoder

    model_cfg = {"arch": "test_resnet", "pretrained": False, "drop_path_rate": 0.0}
    torch.manual_seed(1)
    src = create_model(model_cfg, num_classes=5).eval()
    torch_save(tmp_path / "w.pt", src.state_dict())
    enc = build_encoder({"model": {**model_cfg, "pretrained_file": str(tmp_path / "w.pt")},
                         "embed": {"encoder": "timm"}}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = src.forward_head(src.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(enc(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_run_encoder_loads_fold_checkpoint_without_its_classifier(tmp_path):
    import yaml

    from wbc.core.io import torch_save
    from wbc.models.factory import create_model
    from wbc.optional.embed.encoders import build_encoder

    model_cfg = {"arch": "test_resnet", "pretrained": False, "drop_path_rate": 0.0}
    torch.manual_seed(0)
    fold_model = create_model(model_cfg, num_classes=7).eval()
    run = tmp_path / "outputs" / "lab_foldrun"  # a recipe's run on dataset `lab`
    torch_save(run / "fold1" / "best.pt", fold_model.state_dict())
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model_cfg}))
    cfg = {"output_dir": str(tmp_path / "outputs"), "model": {"arch": "resnet18"}, "data": {"name": "lab"},
           "embed": {"encoder": "run", "init_from_run": "foldrun"},  # the recipe's stem names the run
           "predict": {"weights": "best"}}
    enc = build_encoder(cfg, fold=1).eval()  # arch comes from the run's config.yaml
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = fold_model.forward_head(fold_model.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(enc(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert enc.feat_dim == 96
    with pytest.raises(WBCError, match="fold0/best.pt"):
        build_encoder(cfg, fold=0)
    with pytest.raises(WBCError, match="fold1/last.pt"):  # the weights the run predicts with
        build_encoder({**cfg, "predict": {"weights": "last"}}, fold=1)


def test_labels_per_class_scores_only_labelled_eval_rows(tmp_path):
    from wbc.optional.embed import run as embed_run
    from wbc.optional.embed.run import save_embeddings

    _fake_embed_run(tmp_path)
    e = embed_run.with_defaults({"embed": {"classifiers": ["proto"]}})["embed"]
    e["fewshot"] = {**e["fewshot"], "labels_per_class": 5, "repeats": 1, "classifier": "proto"}
    args = (tmp_path, [0, 1], {"A": 0, "B": 1}, ["A", "B"], e)
    labelled_only = embed_run.labels_per_class(*args, seed=0)["eval_macro_f1"]
    for k in range(2):  # one more eval image, without a label: it must not count as a class of its own
        save_embeddings(tmp_path / f"fold{k}" / "embeddings_eval.npz", ["e0", "e1", "e2"], [[1, 1], [2, 11], [3, 1]],
                        ["A", "B", ""], ["", "", ""])
    assert embed_run.labels_per_class(*args, seed=0)["eval_macro_f1"] == labelled_only


def test_truncated_embeddings_are_one_line(tmp_path):
    from wbc.optional.embed.run import load_embeddings, save_embeddings

    save_embeddings(tmp_path / "embeddings_eval.npz", ["a"], np.zeros((1, 4)), ["LY"], [""])
    assert load_embeddings(tmp_path, "eval")["embeddings"].shape == (1, 4)
    p = tmp_path / "embeddings_eval.npz"
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(WBCError, match=r"embeddings_eval.npz: unreadable embeddings"):
        load_embeddings(tmp_path, "eval")
