"""bf16 autocast, the GPU recipes' precision, run on the CPU through the config's `train.cpu` block. CI has no GPU,
so without these tests no loss, mixer, consistency term, stage-2 head, prediction, embedding loss or Pix2Pix step
would ever see bf16 activations before a paid GPU run did."""
import numpy as np
import pytest
import torch

import wbc.optional.embed.train
import wbc.optional.restore.pix2pix
from helpers import write_folds
from wbc.core.errors import WBCError
from wbc.core.io import load_probs
from wbc.core.run_folder import run_dir
from wbc.core.runtime import device_precision
from wbc.s3_train.inputs import load_fold_data
from wbc.s3_train.loop import train_fold
from wbc.s4_predict.fold import predict_fold


@pytest.fixture
def seen_dtypes():
    """The (training mode, dtype) pairs of all module outputs seen, so a test can tell training steps from
    validation and prediction."""
    seen = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.add((m.training, o.dtype)) if isinstance(o, torch.Tensor) else None)
    yield seen
    hook.remove()


@pytest.mark.parametrize("recipe", [
    ["train.loss.type=logit_adjusted", "train.loss.tau=0.5", "train.sampler.type=sqrt", "train.ema=true",
     "train.stage2.epochs=1"],
    ["train.loss.type=focal", "train.loss.class_weight=effective", "train.mix.mixup_alpha=0.4",
     "train.mix.cutmix_alpha=1.0", "train.mix.remix_kappa=3"],
    ["train.loss.type=balanced_softmax", "train.consistency.weight=2", "train.consistency.views=2"],
], ids=["logit_adjusted+ema+stage2", "focal+mix", "balanced_softmax+consistency"])
@pytest.mark.slow
def test_training_and_prediction_under_bf16(sample_root, make_cfg, seen_dtypes, recipe):
    # 32 px: bf16 is emulated, and about 80x slower than float32, on CPUs without AVX512-BF16 or AMX
    cfg = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=1", "train.cpu.amp=bf16", "predict.tta=2",
                   "data.image_size=32", *recipe)
    write_folds(cfg)
    data = load_fold_data(cfg)
    res = train_fold(cfg, 0, data=data)
    assert (True, torch.bfloat16) in seen_dtypes  # the training steps ran under autocast, not only validation
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in res["history"])
    assert [h["stage"] for h in res["history"]] == [1] + [2] * int(cfg["train"]["stage2"]["epochs"])
    seen_dtypes.clear()
    predict_fold(cfg, 0, data)
    assert (False, torch.bfloat16) in seen_dtypes
    for split in ("oof", "eval", "test"):
        p = load_probs(run_dir(cfg) / "fold0" / f"{split}.csv")
        assert p.probs.dtype != np.float16 and np.isfinite(p.probs).all()
        np.testing.assert_allclose(p.probs.sum(1), 1.0, atol=1e-4)


def test_embedding_losses_under_bf16(tmp_path, seen_dtypes):
    from wbc.optional.embed.encoders import EmbeddingHead, EmbeddingModel
    from wbc.optional.embed.losses import SigLIPLoss, SupConLoss
    from wbc.optional.embed.run import DEFAULTS

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), [30, 12, 6])
    feats = (rng.normal(size=(3, 16))[y] + rng.normal(size=(len(y), 16))).astype(np.float32)
    e = {**DEFAULTS, "epochs": 2, "classes_per_batch": 3, "samples_per_class": 4, "steps_per_epoch": 3,
         "lr": 3e-3, "proj_dim": 8, "hidden_dim": 16}
    for loss in (SigLIPLoss(8, 3, class_embeddings=True), SupConLoss()):
        torch.manual_seed(0)
        model = EmbeddingModel(None, EmbeddingHead(16, 8, 16))
        hist = wbc.optional.embed.train.train_embedding(model, loss, feats, y, e, torch.device("cpu"), tmp_path, seed=0,
                                               amp="bf16")
        assert all(np.isfinite(h["loss"]) for h in hist), type(loss).__name__
    assert (True, torch.bfloat16) in seen_dtypes


@pytest.mark.slow
def test_pix2pix_step_under_bf16(seen_dtypes, monkeypatch):
    from wbc.optional.restore.pix2pix import Pix2Pix

    # the restorer autocasts on CUDA only; forced on here
    monkeypatch.setattr(wbc.optional.restore.pix2pix, "autocast", lambda device, amp="bf16": torch.autocast(
        "cpu", dtype=torch.bfloat16, enabled=amp == "bf16"))
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    model = Pix2Pix({"encoder": "tu-mobilenetv3_small_050", "decoder_channels": [32, 16, 16, 8, 8], "ndf": 8,
                     "epochs": 1, "batch_size": 2, "lr": 1e-3, "lambda_l1": 100, "gan_mode": "vanilla",
                     "num_workers": 0, "amp": "bf16"}, torch.device("cpu"))
    out = model.step(x, y)
    assert all(np.isfinite(v) for v in out.values())
    assert (True, torch.bfloat16) in seen_dtypes


@pytest.mark.slow
def test_the_cpu_block_sets_precision_and_layout_off_cuda(sample_root, make_cfg, seen_dtypes):
    """`train.amp` / `channels_last` are CUDA's; the CPU runs in float32, contiguous, unless `train.cpu` says
    otherwise, so CPU figures measured before the block existed still repeat."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    t = {"amp": "bf16", "channels_last": True, "cpu": {"amp": "none", "channels_last": False}}
    assert (device_precision(t, cuda)["amp"], device_precision(t, cuda)["channels_last"]) == ("bf16", True)
    assert (device_precision(t, cpu)["amp"], device_precision(t, cpu)["channels_last"]) == ("none", False)
    with pytest.raises(WBCError, match=r"train\.cpu\.amp='fp16' on cpu"):
        device_precision({**t, "cpu": {"amp": "fp16"}}, cpu)
    with pytest.raises(WBCError, match=r"train\.amp='bf61'"):
        device_precision({**t, "amp": "bf61"}, cuda)

    cfg = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=1", "train.amp=bf16", "train.channels_last=true",
                   "train.stage2.epochs=0", "data.image_size=32")
    write_folds(cfg)
    train_fold(cfg, 0)
    assert {d for _, d in seen_dtypes} == {torch.float32}  # CUDA's bf16 does not leak onto the CPU

    layouts = []
    orig = torch.nn.Conv2d.forward
    def conv_forward(self, x):  # noqa: E306
        # prediction batches arrive channels_last either way (permuted NHWC arrays); a 1x1 map is both layouts
        if self.training and x.shape[-2:].numel() > 1:
            layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return orig(self, x)
    for cl in (False, True):
        layouts.clear()
        c = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=1", f"train.cpu.channels_last={str(cl).lower()}",
                     "train.stage2.epochs=0", f"name=cl_{cl}", "data.image_size=32")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.Conv2d, "forward", conv_forward)
            train_fold(c, 0)
        assert set(layouts) == {cl}, cl
