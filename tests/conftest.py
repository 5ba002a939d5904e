"""Shared fixtures: the synthetic sample dataset (built once per session) and configs pointed at it."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.pop("WBC_DATA", None)  # tests choose their data explicitly
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    from wbc.data.sample import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("data") / "sample", image_size=64, seed=0)


@pytest.fixture
def data_copy(sample_root, tmp_path):
    """A private copy of the sample dataset that a test may damage."""
    dst = tmp_path / "sample"
    shutil.copytree(sample_root, dst)
    return dst


@pytest.fixture
def make_cfg(tmp_path):
    """load_config(tiny_cpu) pointed at `root`, with outputs, cache and folds under tmp_path."""
    from wbc.config import CONFIG_DIR, load_config

    def make(root, *overrides, config="tiny_cpu.yaml"):
        return load_config(CONFIG_DIR / config, [f"data.root={root}", f"output_dir={tmp_path / 'outputs'}",
                                                 f"data.cache_dir={tmp_path / 'cache'}",
                                                 f"folds.file={tmp_path / 'folds.csv'}", *overrides])

    return make
