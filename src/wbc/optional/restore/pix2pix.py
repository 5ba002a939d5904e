"""Pix2Pix (Isola et al. 2017): smp U-Net generator, 70x70 PatchGAN, L1 + adversarial loss; `Restorer`.

Checkpoints in the run folder are plain state dicts, loaded with weights_only:
  generator.pt  the generator (what `Restorer.load` reads)
  state.pt      generator, discriminator, optimisers, schedulers, epoch and metric history (resume)
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader

from ...core.checkpoint import load_state, save_state
from ...core.console import console, progress
from ...core.errors import WBCError, first_line
from ...core.io import torch_load, torch_save
from ...core.run_folder import read_metrics, write_metrics
from ...core.runtime import resolve_device
from .pairs import PairDataset, to_tensor, to_uint8
from .score import Gate

PAD_MULTIPLE = 32  # the U-Net downsamples 5 times


class Generator(nn.Module):
    def __init__(self, encoder: str = "resnet18", decoder_channels=(256, 128, 64, 32, 16)):
        super().__init__()
        import segmentation_models_pytorch as smp

        try:
            self.net = smp.Unet(encoder, encoder_weights=None, in_channels=3, classes=3,
                                decoder_channels=tuple(decoder_channels))
        except (KeyError, ValueError) as e:
            raise WBCError(f"restorer.encoder '{encoder}': {e}") from None
        head = self.net.segmentation_head[0]
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Residual in tanh space with a zero-initialised head: training starts from the identity, so a
        # briefly trained restorer leaves images almost as they were instead of inventing texture.
        return torch.tanh(torch.atanh(x.clamp(-0.999, 0.999)) + self.net(x))


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN on (input, output) pairs: C64-C128-C256 (stride 2), C512 (stride 1), 1 logit map."""

    def __init__(self, in_channels: int = 6, ndf: int = 64):
        super().__init__()

        def block(i, o, stride, norm=True):
            return [nn.Conv2d(i, o, 4, stride, 1, bias=not norm), *([nn.BatchNorm2d(o)] if norm else []),
                    nn.LeakyReLU(0.2, inplace=True)]

        self.net = nn.Sequential(*block(in_channels, ndf, 2, norm=False), *block(ndf, ndf * 2, 2),
                                 *block(ndf * 2, ndf * 4, 2), *block(ndf * 4, ndf * 8, 1),
                                 nn.Conv2d(ndf * 8, 1, 4, 1, 1))

    def forward(self, damaged: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([damaged, image], 1))


def gan_loss(mode: str):
    if mode == "vanilla":
        bce = nn.BCEWithLogitsLoss()
        return lambda logits, real: bce(logits, torch.full_like(logits, float(real)))
    if mode == "lsgan":
        return lambda logits, real: F.mse_loss(logits, torch.full_like(logits, float(real)))
    raise WBCError(f"restorer.gan_mode must be vanilla or lsgan, got '{mode}'")


def linear_decay(epochs: int):
    """Constant learning rate for the first half of the epochs, then linear decay towards zero."""
    keep = epochs // 2
    return lambda e: 1.0 - max(0, e - keep + 1) / (epochs - keep + 1)


def build_generator(rcfg: dict) -> Generator:
    return Generator(rcfg["encoder"], rcfg.get("decoder_channels") or (256, 128, 64, 32, 16))


RESTORER_FILES = ("config.yaml", "generator.pt", "gate.json")  # what a trained restorer is


def autocast(device: torch.device, amp: str = "bf16"):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and amp == "bf16")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB, capped at 100 (identical images) so means and JSON stay finite."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 100.0 if mse == 0 else float(min(10 * np.log10(255.0 ** 2 / mse), 100.0))


class Pix2Pix:
    """Generator + discriminator + optimisers; `step(damaged, clean)` is one training iteration."""

    def __init__(self, rcfg: dict, device: torch.device):
        self.device = device
        self.G = build_generator(rcfg).to(device)
        self.D = PatchDiscriminator(ndf=int(rcfg.get("ndf", 64))).to(device)
        lr, beta1 = float(rcfg["lr"]), float(rcfg.get("beta1", 0.5))
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=lr, betas=(beta1, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=lr, betas=(beta1, 0.999))
        decay = linear_decay(int(rcfg["epochs"]))
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, decay)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, decay)
        self.gan = gan_loss(rcfg.get("gan_mode", "vanilla"))
        self.lambda_l1 = float(rcfg["lambda_l1"])
        self.amp = rcfg.get("amp", "bf16")

    def step(self, damaged: torch.Tensor, clean: torch.Tensor) -> dict:
        damaged, clean = damaged.to(self.device, non_blocking=True), clean.to(self.device, non_blocking=True)
        self.G.train()
        self.D.train()
        with autocast(self.device, self.amp):
            fake = self.G(damaged)
            d_loss = 0.5 * (self.gan(self.D(damaged, clean), True) + self.gan(self.D(damaged, fake.detach()), False))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        with autocast(self.device, self.amp):
            g_adv = self.gan(self.D(damaged, fake), True)
            l1 = F.l1_loss(fake.float(), clean)
            g_loss = g_adv + self.lambda_l1 * l1
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        return {"l1": l1.item(), "g_adv": g_adv.item(), "d": d_loss.item()}

    def parts(self) -> dict:
        """What a resume restores (`core.checkpoint`)."""
        return {"G": self.G, "D": self.D, "opt_g": self.opt_g, "opt_d": self.opt_d, "sched_g": self.sched_g,
                "sched_d": self.sched_d}


def train_pix2pix(rcfg: dict, images: np.ndarray, run_dir, device: torch.device, seed: int = 0,
                  val: tuple[np.ndarray, np.ndarray] | None = None, resume: bool = True) -> Generator:
    """Train on pairs made from clean `images`; `val` = fixed (damaged, clean) uint8 arrays for PSNR.

    Writes generator.pt, state.pt and metrics.jsonl under `run_dir` after every epoch; resumes from state.pt.
    """
    if not len(images):
        raise WBCError("no clean images to train the restorer on")
    run_dir = Path(run_dir)
    torch.manual_seed(seed)
    model = Pix2Pix(rcfg, device)
    epochs, start, history = int(rcfg["epochs"]), 0, []
    state_path = run_dir / "state.pt"
    if resume and state_path.exists():
        start = int(load_state(state_path, model.parts())["epoch"])
        history = read_metrics(run_dir)[:start]
        console.print(f"resuming the restorer from epoch {start}")
    ds = PairDataset(images, crop=rcfg.get("crop"), max_severity=int(rcfg.get("max_severity", 3)), seed=seed)
    bs = int(rcfg["batch_size"])
    workers = int(rcfg.get("num_workers", 0))
    loader_gen = torch.Generator()
    steps_cap = rcfg.get("steps_per_epoch")
    n_steps = max(len(ds) // bs, 1) if steps_cap is None else int(steps_cap)
    for epoch in range(start, epochs):
        loader_gen.manual_seed(seed * 1000 + epoch)
        # Workers copy the dataset when a pass starts, so set_epoch must come before each pass.
        loader = DataLoader(ds, batch_size=bs, shuffle=True, drop_last=len(ds) >= bs, num_workers=workers,
                            generator=loader_gen, pin_memory=device.type == "cuda")
        sums, n, passes = {}, 0, 0
        with progress() as bar:
            task = bar.add_task(f"restorer {epoch + 1}/{epochs}", total=n_steps, info="")
            while n < n_steps:  # a capped epoch may need fewer batches than one pass, a short set more
                ds.set_epoch(epoch * 1000 + passes)
                passes += 1
                for damaged, clean in loader:
                    for k, v in model.step(damaged, clean).items():
                        sums[k] = sums.get(k, 0.0) + v
                    n += 1
                    bar.update(task, advance=1, info=f"L1 {sums['l1'] / n:.4f}")
                    if n >= n_steps:
                        break
        row = {"epoch": epoch + 1, "lr": model.opt_g.param_groups[0]["lr"], **{k: v / n for k, v in sums.items()}}
        model.sched_g.step()
        model.sched_d.step()
        if val is not None:
            out = restore_batches(model.G, val[0], device, bs, rcfg.get("amp", "bf16"))
            row["val_psnr_damaged"] = float(np.mean([psnr(a, b) for a, b in zip(val[0], val[1])]))
            row["val_psnr_restored"] = float(np.mean([psnr(a, b) for a, b in zip(out, val[1])]))
        history.append(row)
        torch_save(run_dir / "generator.pt", model.G.state_dict())
        save_state(run_dir / "state.pt", model.parts(), epoch=epoch + 1)
        write_metrics(run_dir, history)
        console.print(f"restorer epoch {epoch + 1}/{epochs}  " + "  ".join(
            f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"), highlight=False)
    return model.G


def _pad(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % PAD_MULTIPLE, (-w) % PAD_MULTIPLE
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


@torch.inference_mode()
def restore_batches(G: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 16,
                    amp: str = "bf16") -> np.ndarray:
    """Run the generator on every image (uint8 NxHxWx3, any H and W); same shape and dtype back."""
    was_training = G.training
    G.eval()
    out = np.empty(np.shape(images), np.uint8)
    for i in range(0, len(images), batch_size):
        x, h, w = _pad(to_tensor(np.asarray(images[i:i + batch_size])).to(device))
        with autocast(device, amp):
            y = G(x)
        out[i:i + batch_size] = to_uint8(y[..., :h, :w])
    G.train(was_training)
    return out


class Restorer:
    """Gate + generator. `restorer(images) -> (restored, scores, restored_mask)`; images the gate judges
    clean come back unchanged.

    With `image_size` set (the size it was trained at), other sizes are resized to it (short side) for
    scoring and restoring, and restored images are resized back: the gate's noise statistics and the
    simulator's blur radii both depend on the pixel scale.
    """

    def __init__(self, generator: nn.Module, gate: Gate, device="cpu", batch_size: int = 16, amp: str = "bf16",
                 image_size: int | None = None):
        self.device = resolve_device(str(device))
        self.G = generator.to(self.device).eval()
        self.gate = gate
        self.batch_size = batch_size
        self.amp = amp
        self.image_size = image_size

    @classmethod
    def load(cls, run_dir, device="cpu") -> "Restorer":
        run_dir = Path(run_dir)
        for name in RESTORER_FILES:
            if not (run_dir / name).exists():
                raise WBCError(f"{run_dir / name}: not found (run `make train-restorer` first)")
        rcfg = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("restorer")
        if not rcfg:
            raise WBCError(f"{run_dir / 'config.yaml'}: no restorer section")
        G = build_generator(rcfg)
        try:
            G.load_state_dict(torch_load(run_dir / "generator.pt"))
        except RuntimeError as e:
            msg = first_line(e)
            raise WBCError(f"{run_dir / 'generator.pt'}: does not match config.yaml ({msg})") from None
        return cls(G, Gate.load(run_dir / "gate.json"), device, int(rcfg.get("batch_size", 16)),
                   rcfg.get("amp", "bf16"), rcfg.get("image_size"))

    def restore(self, images: np.ndarray) -> np.ndarray:
        """Every image through the generator, ignoring the gate."""
        return restore_batches(self.G, images, self.device, self.batch_size, self.amp)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise WBCError(f"Restorer needs uint8 NxHxWx3 images, got {images.dtype} {images.shape}")
        h, w = images.shape[1:3]
        work = images
        if self.image_size and min(h, w) != self.image_size:
            f = self.image_size / min(h, w)
            size = (max(round(w * f), 1), max(round(h * f), 1))
            interp = cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC
            work = np.stack([cv2.resize(im, size, interpolation=interp) for im in images])
        scores, mask = self.gate(work)
        out = images.copy()
        if mask.any():
            restored = self.restore(work[mask])
            if work is not images:
                interp = cv2.INTER_AREA if restored.shape[1] > h else cv2.INTER_CUBIC
                restored = np.stack([cv2.resize(im, (w, h), interpolation=interp) for im in restored])
            out[mask] = restored
        return out, scores, mask

