"""Multi-crop views through lightly's transforms (DINO: 2 global + local crops; FastSiam: equal views), each view
after an optional draw of the project's damage simulator on the uint8 image, so the features learn to ignore the
noise, blur and lighting faults of the phase-2 images.

Every random draw of a sample's views (lightly's transforms use numpy's and torch's global generators) is seeded by
(seed, epoch, index) and the global generators are put back after, so the views are the same with any worker count
and a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ...s1_data.damage import damage


@contextlib.contextmanager
def seeded(seed: int):
    """numpy's, Python's and torch's global generators seeded with `seed` inside, restored after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(seed % 2**32)
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class DamagedView:
    """One of lightly's view transforms, after the damage simulator (chance `p`, severity 1..`max_severity`)."""

    def __init__(self, view, p: float, max_severity: int):
        self.view, self.p, self.max_severity = view, float(p), int(max_severity)

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        if self.p > 0 and np.random.random() < self.p:
            severity = int(np.random.randint(1, self.max_severity + 1))
            img = damage(img, severity, np.random.default_rng(int(np.random.randint(2**31))))
        return self.view(Image.fromarray(img))


def build_views(s: dict, mean, std) -> list[DamagedView]:
    """The method's view transforms (lightly's), normalised with the backbone's mean / std. Flips and 90-degree
    rotations are on at `flip_rotate`: a cell has no up or left."""
    from lightly.transforms import DINOTransform, FastSiamTransform

    norm = {"mean": list(mean), "std": list(std)}
    p = float(s["flip_rotate"])
    if s["method"] == "dino":
        t = DINOTransform(global_crop_size=int(s["global_crop_size"]), global_crop_scale=tuple(s["global_crop_scale"]),
                          local_crop_size=int(s["local_crop_size"]), local_crop_scale=tuple(s["local_crop_scale"]),
                          n_local_views=int(s["local_views"]), hf_prob=p, vf_prob=p, rr_prob=p,
                          cj_strength=float(s["color_jitter"]), random_gray_scale=float(s["gray"]),
                          solarization_prob=float(s["solarize"]), normalize=norm)
    else:
        t = FastSiamTransform(num_views=int(s["views"]), input_size=int(s["global_crop_size"]),
                              min_scale=float(s["global_crop_scale"][0]), hf_prob=p, vf_prob=p, rr_prob=p,
                              cj_strength=float(s["color_jitter"]), random_gray_scale=float(s["gray"]), normalize=norm)
    return [DamagedView(v, s["damage_p"], s["damage_max_severity"]) for v in t.transforms]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ViewsDataset(Dataset):
    """uint8 (N, H, W, 3) images -> the list of a sample's views; items are `(epoch, index)` (`EpochTagged`)."""

    def __init__(self, images, views: list, seed: int):
        self.images, self.views, self.seed = images, views, int(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item) -> list[torch.Tensor]:
        epoch, i = item
        img = np.array(self.images[i])  # a copy: memmaps are read-only
        with seeded(sample_seed(self.seed, epoch, i)):
            return [v(img) for v in self.views]
