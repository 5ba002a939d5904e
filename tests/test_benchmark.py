"""The throughput benchmark measures what it says: the ratio is pipeline / plain, and a slow loader is named."""
import json
import time

import pytest

from wbc.config import run_dir
from wbc.data.dataset import CellDataset
from wbc.folds import build_folds
from wbc.io import write_csv
from wbc.train.benchmark import benchmark


@pytest.fixture
def cfg(sample_root, make_cfg):
    c = make_cfg(sample_root, "train.batch_size=8")
    write_csv(c["folds"]["file"], build_folds(c))
    return c


def test_ratio_and_json(cfg):
    res = benchmark(cfg, steps=4, warmup=1)
    saved = json.loads((run_dir(cfg) / "throughput.json").read_text())
    assert saved == pytest.approx(res)
    assert res["ratio"] == pytest.approx(res["pipeline_img_per_s"] / res["plain_img_per_s"])
    # In one process the pipeline does the loader's work plus the step, so it cannot outrun either.
    assert 0 < res["pipeline_img_per_s"] < res["loader_img_per_s"]
    assert res["pipeline_img_per_s"] < res["plain_img_per_s"]
    assert (res["arch"], res["batch_size"], res["steps"]) == ("test_resnet", 8, 4)


def test_slow_loader_is_named(cfg, monkeypatch):
    get = CellDataset.__getitem__

    def slow(self, i):
        time.sleep(0.02)  # 8 images = 0.16 s a batch, far slower than a tiny model's step
        return get(self, i)

    monkeypatch.setattr(CellDataset, "__getitem__", slow)
    res = benchmark(cfg, steps=3, warmup=1)
    assert res["loader_img_per_s"] < 60 < res["plain_img_per_s"]
    assert res["limited_by"] == "input pipeline"
    assert res["ratio"] < 0.5
