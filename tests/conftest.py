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
    from wbc.s1_data.sample import make_sample_dataset

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
    from wbc.core.config import CONFIG_DIR, load_config

    def make(root, *overrides, config="recipes/tiny_cpu.yaml"):
        return load_config(CONFIG_DIR / config, [f"data.root={root}", f"output_dir={tmp_path / 'outputs'}",
                                                 f"data.cache_dir={tmp_path / 'cache'}",
                                                 f"folds.file={tmp_path / 'folds.csv'}", *overrides])

    return make


@pytest.fixture
def cfg2(sample_root, make_cfg):
    """Two folds written, so a test can cover the whole pool quickly; 32 px unless a test asks for more."""
    from helpers import write_folds

    def make(*overrides):
        return write_folds(make_cfg(sample_root, "folds.n_folds=2", "data.image_size=32", *overrides))
    return make
