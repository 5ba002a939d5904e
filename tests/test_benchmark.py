"""The throughput benchmark measures what it says: the ratio is pipeline / plain, and a slow loader is named.

The benchmark's clock is replaced by one that only the tests' fake work advances (a loaded image, a model's
forward pass), so every figure here is exact whatever else the machine is doing."""
import json

import pytest
import torch

from helpers import write_folds
from wbc.core.run_folder import run_dir
from wbc.ops.benchmark import benchmark
from wbc.s1_data.dataset import CellDataset


@pytest.fixture
def cfg(sample_root, make_cfg):
    c = make_cfg(sample_root, "train.batch_size=8")
    write_folds(c)
    return c


def fake_costs(monkeypatch, per_image: float, per_forward: float) -> None:
    """The benchmark's clock advances `per_image` seconds per loaded image and `per_forward` per model call."""
    import wbc.ops.benchmark as bench

    now = [0.0]
    monkeypatch.setattr(bench, "clock", lambda: now[0])
    get, call = CellDataset.__getitem__, torch.nn.Module.__call__

    def load(self, i):
        now[0] += per_image
        return get(self, i)

    def forward(self, *a, **k):
        if self.__class__.__name__ == "ResNet":
            now[0] += per_forward
        return call(self, *a, **k)

    monkeypatch.setattr(CellDataset, "__getitem__", load)
    monkeypatch.setattr(torch.nn.Module, "__call__", forward)


def test_ratio_and_json(cfg, monkeypatch):
    fake_costs(monkeypatch, per_image=0.001, per_forward=0.002)
    res = benchmark(cfg, steps=4, warmup=1)
    saved = json.loads((run_dir(cfg) / "throughput.json").read_text())
    assert saved == pytest.approx(res)
    # 8 images a batch: the loader 8 ms, the step 2 ms; the pipeline pays both, in one process
    assert res["loader_img_per_s"] == pytest.approx(1000) and res["plain_img_per_s"] == pytest.approx(4000)
    assert res["pipeline_img_per_s"] == pytest.approx(800)
    assert res["ratio"] == pytest.approx(0.2) and res["limited_by"] == "input pipeline"
    assert (res["arch"], res["batch_size"], res["steps"]) == ("test_resnet", 8, 4)


@pytest.mark.slow
def test_slow_loader_is_named(cfg, monkeypatch):
    fake_costs(monkeypatch, per_image=0.02, per_forward=0.001)  # 0.16 s a batch against a 1 ms step
    res = benchmark(cfg, steps=3, warmup=1)
    assert res["loader_img_per_s"] == pytest.approx(50) and res["plain_img_per_s"] == pytest.approx(8000)
    assert res["limited_by"] == "input pipeline" and res["ratio"] < 0.01


@pytest.mark.slow
def test_slow_model_is_named(cfg, monkeypatch):
    fake_costs(monkeypatch, per_image=0.0001, per_forward=0.2)  # 8 images a step: 40 img/s
    res = benchmark(cfg, steps=3, warmup=1)
    assert res["plain_img_per_s"] == pytest.approx(40) and res["loader_img_per_s"] == pytest.approx(10000)
    assert res["limited_by"] == "model step"


@pytest.mark.slow
def test_consistency_views_go_through_the_model_on_both_sides(sample_root, make_cfg, monkeypatch):
    """With train.consistency on, the pipeline feeds (B, V, ...) batches and the plain loop forwards B x V images
    a step, so the ratio compares like with like."""
    c = make_cfg(sample_root, "train.batch_size=8", "train.consistency.weight=1", "train.consistency.views=2")
    write_folds(c)
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

    from wbc.ops.benchmark import count_syncs

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
