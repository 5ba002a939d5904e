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


def test_slow_model_is_named(cfg, monkeypatch):
    import torch

    real = torch.nn.Module.__call__

    def slow(self, *a, **k):
        if self.__class__.__name__ == "ResNet":
            time.sleep(0.2)  # 8 images a step: at most 40 img/s, far slower than loading them
        return real(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "__call__", slow)
    res = benchmark(cfg, steps=3, warmup=1)
    assert res["plain_img_per_s"] < 40 < res["loader_img_per_s"]
    assert res["limited_by"] == "model step"


def test_consistency_views_go_through_the_model_on_both_sides(sample_root, make_cfg, monkeypatch):
    """With train.consistency on, the pipeline feeds (B, V, ...) batches and the plain loop forwards B x V images
    a step, so the ratio compares like with like."""
    import torch

    c = make_cfg(sample_root, "train.batch_size=8", "train.consistency.weight=1", "train.consistency.views=2")
    write_csv(c["folds"]["file"], build_folds(c))
    sizes = []
    real = torch.nn.Module.__call__

    def spy(self, *a, **k):
        if self.__class__.__name__ == "ResNet" and a and torch.is_tensor(a[0]):
            sizes.append(len(a[0]))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "__call__", spy)
    res = benchmark(c, steps=2, warmup=1)
    assert res["views"] == 2
    # warm-up + steps on the pipeline, then on the plain loop: every forward is 8 images x 2 views.
    assert sizes == [16] * 6


def test_sync_count_reads_cudas_sync_debug_warnings(monkeypatch):
    """On CUDA the benchmark counts the pipeline's host-device syncs from the warnings of CUDA's sync debug mode
    (faked here: no GPU), and always leaves that mode off again."""
    import warnings

    import torch

    from wbc.train.benchmark import count_syncs

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with count_syncs(torch.device("cuda")) as found:
        for _ in range(9):  # what torch emits for each .item() or pageable copy under mode "warn"
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
        warnings.warn("something else", UserWarning)
    assert found == [9] and modes == ["warn", "default"]

    with pytest.raises(RuntimeError), count_syncs(torch.device("cuda")):
        raise RuntimeError("step failed")
    assert modes[-1] == "default"
    with count_syncs(torch.device("cpu")) as found:
        pass
    assert found == [None]
