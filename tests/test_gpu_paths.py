"""Fake-CUDA runs (PyTorch's FakeTensorMode: shapes and devices, no data) of the device paths beyond the training
batch of `test_train.py`: inference, embeddings, the restorer, the throughput benchmark, a two-stage fold and its
predictions with BatchNorm adaptation. A tensor left on the CPU raises a device mismatch here as on a GPU, found
before the lent GPU's minutes are spent on it. Autograd, `.item()` and the like need a CUDA runtime or values:
each test patches the few it meets, and production code runs otherwise as it is."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from helpers import write_folds
from wbc.models import inference
from wbc.s1_data import dataset

CUDA = torch.device("cuda")


def unset(f, *a):
    """`f(*a)` outside fake mode: host-side code that needs values."""
    with unset_fake_temporarily():
        return f(*a)


def _module_to(self, *a, **k):
    """`Module.to` with new parameters: PyTorch's own swaps them in place, which fake tensors do not allow."""
    device, dtype, non_blocking, fmt = torch._C._nn._parse_to(*a, **k)

    def convert(t):
        return t.to(device, dtype if t.is_floating_point() else None, non_blocking,
                    memory_format=fmt if fmt is not None and t.dim() in (4, 5) else torch.preserve_format)

    for m in self.modules():
        m._parameters.update({n: torch.nn.Parameter(convert(p.data), p.requires_grad)
                              for n, p in m._parameters.items() if p is not None})
        m._buffers.update({n: convert(b) for n, b in m._buffers.items() if b is not None})
    return self


@pytest.fixture
def fake_cuda(monkeypatch):
    """Fake mode with the few host-side calls fake tensors lack, patched as narrowly as possible."""
    def host_numpy(self, *a, **k):
        assert self.device.type == "cpu", f"numpy() of a {self.device} tensor: the code must copy it to the host"
        return np.zeros(tuple(self.shape), np.float32)

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)  # NYI for fake tensors
    monkeypatch.setattr(torch.nn.Module, "to", _module_to)  # fake parameters cannot be swapped in place
    monkeypatch.setattr(torch.Tensor, "numpy", host_numpy)  # fake tensors have no data to hand over
    inference._stats.cache_clear()  # fake constants must not outlive the fake mode
    try:
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):  # sizes from masks: symbolic
            yield
    finally:
        inference._stats.cache_clear()


def test_predict_probs_with_tta_bf16_and_channels_last(fake_cuda):
    """Every dihedral view under bf16 autocast in channels-last, the probabilities read back once at the end."""
    import timm

    from wbc.models.inference import predict_probs

    model = timm.create_model("test_resnet", num_classes=4).to(CUDA)  # the caller's move
    images = np.zeros((5, 32, 32, 3), np.uint8)
    p = predict_probs(model, images, CUDA, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), tta=8, batch_size=2, amp="bf16",
                      channels_last=True)
    assert p.shape == (5, 4)


@pytest.mark.parametrize("loss", ["siglip", "supcon"])
def test_an_embedding_epoch_and_export_stay_on_the_device(fake_cuda, monkeypatch, tmp_path, loss):
    """`train_embedding` for one step and `embed_array`, on the model and loss `run_embed` builds (timm backbone,
    projection head with a CE classifier, SigLIP's learnable t', b and class embeddings)."""
    from wbc.core.config import CONFIG_DIR, load_config
    from wbc.optional.embed.encoders import EmbeddingHead, EmbeddingModel, timm_encoder
    from wbc.optional.embed.losses import build_loss
    from wbc.optional.embed.run import with_defaults
    from wbc.optional.embed.train import embed_array, train_embedding

    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: None)  # autograd needs a CUDA runtime
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: 0.0)  # no value to read: the logged loss, t' and b
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: True)  # SupCon's `if not has.any()`: balanced batches
    monkeypatch.setattr("wbc.optional.embed.train.torch_save", lambda *a, **k: None)  # nor any to save
    monkeypatch.setattr("wbc.core.checkpoint.torch_save", lambda *a, **k: None)
    cfg = with_defaults(load_config(CONFIG_DIR / "steps/embed_tiny_cpu.yaml",
                                    [f"embed.loss={loss}", "embed.ce_weight=0.5"]))
    e = {**cfg["embed"], "epochs": 1, "steps_per_epoch": 1, "classes_per_batch": 2, "samples_per_class": 2}
    enc = timm_encoder(cfg["model"])
    model = EmbeddingModel(enc, EmbeddingHead(enc.feat_dim, int(e["proj_dim"]), int(e["hidden_dim"]), 3))
    loss_fn = build_loss(e, int(e["proj_dim"]), 3)
    norm = {"mean": enc.mean, "std": enc.std}
    images, y = np.zeros((6, 32, 32, 3), np.uint8), np.array([0, 0, 1, 1, 2, 2])
    train_embedding(model, loss_fn, images, y, e, CUDA, tmp_path, 0, None, norm, "bf16")
    assert embed_array(model, images, CUDA, norm, batch_size=4, amp="bf16", tta=2).shape == (6, int(e["proj_dim"]))


@pytest.mark.slow
def test_a_restorer_step_and_restoration_stay_on_the_device(fake_cuda, monkeypatch, tmp_path):
    """`Pix2Pix.step` (generator and discriminator losses, both optimisers) at `test_restore.py`'s tiny settings,
    and `data.restore` as the image cache runs it: `build_preprocess` loads the restorer onto the config's device
    (gate on the host, padded generator batches, bf16)."""
    import yaml

    from wbc.optional.restore import pix2pix
    from wbc.optional.restore import preprocess as restore_step
    from wbc.optional.restore.pairs import to_tensor
    from wbc.optional.restore.score import Gate
    from wbc.s1_data import preprocess

    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: None)  # autograd needs a CUDA runtime
    monkeypatch.setattr(pix2pix, "resolve_device", lambda device: torch.device(device))  # its check wants a ...
    monkeypatch.setattr(restore_step, "pick_device", lambda cfg: CUDA)  # ... CUDA runtime, as does `device: auto`
    rcfg = {"encoder": "tu-mobilenetv3_small_050", "decoder_channels": [32, 16, 16, 8, 8], "ndf": 8, "epochs": 2,
            "lr": 1e-3, "lambda_l1": 100, "gan_mode": "vanilla", "amp": "bf16", "batch_size": 2, "image_size": 64}
    model = pix2pix.Pix2Pix(rcfg, CUDA)
    pair = to_tensor(np.zeros((2, 64, 64, 3), np.uint8))  # as the loader gives them, on the host
    assert set(model.step(pair, pair)) == {"l1", "g_adv", "d"}

    unset(lambda: torch.save(pix2pix.build_generator(rcfg).state_dict(), tmp_path / "generator.pt"))  # as trained
    Gate(threshold=-np.inf).save(tmp_path / "gate.json")  # every image judged damaged
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"restorer": rcfg}))
    devices, run = [], pix2pix.restore_batches
    monkeypatch.setattr(pix2pix, "restore_batches",
                        lambda G, x, device, *a: devices.append(device) or run(G, x, device, *a))
    restore = preprocess.build_preprocess({"data": {"restore": True, "restore_dir": str(tmp_path)}})
    out = restore(np.zeros((3, 40, 50, 3), np.uint8), "phase2_test")
    assert out.shape == (3, 40, 50, 3) and out.dtype == np.uint8 and devices == [CUDA]


def test_throughput_benchmark_stays_on_the_device(sample_root, make_cfg, fake_cuda, monkeypatch):
    """`benchmark` on CUDA: the trainer's epoch (`_train_epoch`, gradient clipping and the device-side loss sum
    included), the loader alone, and the plain loop over images resident on the device."""
    import wbc.ops.benchmark as bench

    monkeypatch.setattr(bench, "pick_device", lambda cfg: CUDA)  # fake mode has no CUDA runtime: ...
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # ... no queue to wait for, ...
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)  # ... no syncs to count, ...
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")  # ... no name
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: None)  # nor autograd
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: 1.0)  # the epoch's loss: no value to read
    cfg = make_cfg(sample_root, "train.batch_size=4", "train.amp=bf16", "train.channels_last=true",
                   "train.ema=false", "train.grad_clip=1.0")
    write_folds(cfg)
    res = bench.benchmark(cfg, steps=2, warmup=1)
    assert res["device"] == "cuda" and res["pipeline_syncs_per_step"] == 0


@pytest.mark.slow
def test_a_two_stage_fold_stays_on_the_device(sample_root, make_cfg, fake_cuda, monkeypatch):
    """`train_fold` for one epoch of each stage: the model's move, the optimizer step, validation and, in stage 2,
    the new classifier of `reset_classifier`. timm's EMA makes a CUDA generator, which needs a CUDA runtime: off."""
    from wbc.s3_train import loop

    monkeypatch.setattr(loop, "pick_device", lambda cfg: CUDA)  # fake mode has no CUDA runtime, ...
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: None)  # ... no autograd, ...
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: 1.0)  # ... no loss value to read, ...
    monkeypatch.setattr(loop, "_save_weights", lambda *a, **k: None)  # ... nor weights to save
    monkeypatch.setattr("wbc.core.checkpoint.torch_save", lambda *a, **k: None)
    monkeypatch.setattr(loop, "check_finite", lambda *a, **k: None)  # every read value is 1.0, a "non-finite" count too
    draw = dataset.EpochTagged.__iter__
    monkeypatch.setattr(dataset.EpochTagged, "__iter__", lambda self: unset(draw, self))  # host-side draws: real
    cfg = make_cfg(sample_root, "train.epochs=1", "train.stage2.epochs=1", "train.sampler.type=none",
                   "train.stage2.sampler=none", "train.batch_size=32", "train.amp=bf16",
                   "train.channels_last=true", "train.grad_clip=1.0")
    write_folds(cfg)
    res = loop.train_fold(cfg, 0)
    assert [r["stage"] for r in res["history"]] == [1, 2]


@pytest.mark.slow
def test_fold_predictions_with_adapted_batchnorm_stay_on_the_device(sample_root, make_cfg, fake_cuda, monkeypatch):
    """`predict_fold` as `train-fold` runs it after training: a checkpoint loaded from disk and moved, BatchNorm
    statistics adapted to each split, TTA and bf16."""
    from wbc.core.io import torch_save
    from wbc.core.run_folder import run_dir
    from wbc.models.factory import create_model
    from wbc.s3_train.inputs import load_fold_data
    from wbc.s4_predict.fold import predict_fold

    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: 1.0)  # BatchNorm's 1 / float(num_batches_tracked)
    cfg = make_cfg(sample_root, "predict.adapt_bn=0.5", "train.amp=bf16")
    write_folds(cfg)
    data = load_fold_data(cfg)
    weights = unset(lambda: create_model(cfg["model"], len(data.classes)).state_dict())  # as trained: real
    torch_save(run_dir(cfg) / "fold0" / "best.pt", weights)
    res = predict_fold(cfg, 0, data, CUDA)
    assert {"oof", "eval"} <= set(res)
