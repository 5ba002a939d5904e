"""env.json: what each start of a fold ran on, and a warning when a resume runs on other kernels or libraries."""
import json
import os
import platform
import subprocess
import sys

import pytest

from helpers import write_folds
from wbc.core import environment
from wbc.core.run_folder import run_dir
from wbc.s3_train import loop
from wbc.s3_train.loop import StopTraining, train_fold


def test_describe_records_versions_cpu_and_kernel_settings():
    env = environment.describe()
    assert env["packages"]["torch"].startswith("2.") and env["packages"]["albumentations"] == "2.0.8"
    assert env["cpu_capability"] and env["torch_threads"] >= 1 and env["cpu"]
    json.dumps(env)  # JSON-ready


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="ATen's AVX2 kernels exist on x86_64 only")
def test_capped_instruction_set_is_recorded():
    code = "import json; from wbc.core.environment import describe; d = describe(); " \
           "print(json.dumps([d['cpu_capability'], d['kernel_env']]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    cap, kernel_env = json.loads(out.stdout)
    assert cap == "AVX2"
    assert kernel_env["ATEN_CPU_CAPABILITY"] == "avx2" and kernel_env["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_differences_name_each_changed_setting():
    old = {"cpu": "A", "cpu_capability": "AVX512", "packages": {"pillow": "12.3.0", "numpy": "2.4.6"},
           "kernel_env": {}, "git_commit": "x"}
    new = {"cpu": "A", "cpu_capability": "AVX2", "packages": {"pillow": "13.0.0", "numpy": "2.4.6"},
           "kernel_env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "git_commit": "y"}
    assert environment.differences(old, new) == [
        "cpu_capability: AVX512 -> AVX2", "packages.pillow: 12.3.0 -> 13.0.0",
        "kernel_env.ONEDNN_MAX_CPU_ISA: None -> AVX2"]
    assert environment.differences(old, old) == []


@pytest.mark.slow
def test_fold_records_each_start_and_warns_when_resumed_elsewhere(sample_root, make_cfg, monkeypatch):
    cfg = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=2")
    write_folds(cfg)

    def kill(epoch, rec):
        raise StopTraining

    with pytest.raises(StopTraining):
        train_fold(cfg, 0, on_epoch=kill)
    path = run_dir(cfg) / "fold0" / "env.json"
    first = json.loads(path.read_text())
    assert len(first) == 1 and first[0]["start_epoch"] == 0
    assert first[0]["cpu_capability"] == environment.describe()["cpu_capability"]

    real = environment.describe
    monkeypatch.setattr(loop, "describe", lambda: {**real(), "cpu_capability": "ELSEWHERE"})
    said = []
    monkeypatch.setattr(loop.console, "print", lambda *a, **k: said.append(" ".join(map(str, a))))
    train_fold(cfg, 0, resume=True)
    starts = json.loads(path.read_text())
    assert [s["start_epoch"] for s in starts] == [0, 1]
    assert starts[0] == first[0] and starts[1]["cpu_capability"] == "ELSEWHERE"
    warned = [s for s in said if "resumes in another environment" in s]
    assert len(warned) == 1 and f"cpu_capability: {first[0]['cpu_capability']} -> ELSEWHERE" in warned[0]

    train_fold(cfg, 0)  # a fresh start replaces the record
    assert [s["start_epoch"] for s in json.loads(path.read_text())] == [0]


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_switch_holds_during_training_only(sample_root, make_cfg, deterministic):
    import torch

    cfg = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=1",
                   f"train.deterministic={str(deterministic).lower()}")
    write_folds(cfg)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    seen = []
    train_fold(cfg, 0, on_epoch=lambda e, r: seen.append((torch.are_deterministic_algorithms_enabled(),
                                                          torch.backends.cudnn.deterministic,
                                                          torch.backends.cudnn.benchmark)))
    assert seen == [(deterministic, deterministic, not deterministic)]
    assert json.loads((run_dir(cfg) / "fold0" / "env.json").read_text())[0]["deterministic"] is deterministic
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads /proc/cpuinfo")
def test_cpu_name_carries_family_and_model_numbers():
    fields = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines()
                  if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "cpu family" not in fields:
        pytest.skip("this CPU reports no family number")
    assert environment.cpu_name() == f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
