"""`make train-jobs`: a scheduler job per config x fold [x seed] through submitit. Its local executor (a process per
job, as a SLURM array task would be) runs here; a job trains with the very function `train-fold` calls, so its fold
must be byte for byte the fold trained in this process."""
import json

import pytest
import torch

from helpers import make, write_folds

TINY = ["folds.n_folds=2", "data.image_size=32", "train.epochs=1", "predict.tta=1"]
CONFIG = "configs/recipes/tiny_cpu.yaml"


def path_overrides(cfg: dict) -> list[str]:
    return [f"data.root={cfg['data']['root']}", f"output_dir={cfg['output_dir']}",
            f"data.cache_dir={cfg['data']['cache_dir']}", f"folds.file={cfg['folds']['file']}"]


@pytest.mark.slow
def test_local_jobs_train_folds_as_in_process_a_failed_one_is_reported_and_a_resubmission_resumes(
        sample_root, make_cfg, tmp_path):
    from wbc.core.errors import WBCError
    from wbc.ops.deadline import Deadline
    from wbc.ops.fold_runner import train_folds
    from wbc.ops.jobs import train_jobs

    cfg = write_folds(make_cfg(sample_root, *TINY))
    overrides = [*path_overrides(cfg), *TINY, "name=jobs"]
    with pytest.raises(WBCError, match=r"1 of 3 job\(s\) failed \(jobs fold 7\)"):  # fold 7 is not in the folds
        train_jobs([CONFIG], [0, 1, 7], None, overrides, False, "local", {}, poll_s=0.5)
    summary = json.loads(next((tmp_path / "outputs" / "jobs").glob("*/jobs.json")).read_text())
    assert [(s["run"], s["fold"], s["state"]) for s in summary] == [("jobs", 0, "done"), ("jobs", 1, "done"),
                                                                    ("jobs", 7, "failed")]
    assert "--fold 7: folds.n_folds is" in summary[2]["error"] and all(s["job_id"] for s in summary)

    train_folds(make_cfg(sample_root, *TINY, "name=alone"), [0, 1], resume=False, deadline=Deadline())
    jobs, alone = tmp_path / "outputs" / "jobs", tmp_path / "outputs" / "alone"
    for fold in (0, 1):
        for name in ("oof.csv", "eval.csv", "test.csv"):
            assert (jobs / f"fold{fold}" / name).read_bytes() == (alone / f"fold{fold}" / name).read_bytes(), name
        a, b = (torch.load(d / f"fold{fold}" / "best.pt") for d in (jobs, alone))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    stamps = {f: (jobs / f"fold{f}" / "oof.csv").stat().st_mtime_ns for f in (0, 1)}
    records = train_jobs([CONFIG], [0, 1], None, overrides, True, "local", {}, poll_s=0.5)  # RESUME=1
    assert [r.state for r in records] == ["done", "done"]
    assert stamps == {f: (jobs / f"fold{f}" / "oof.csv").stat().st_mtime_ns for f in (0, 1)}  # nothing retrained
    assert all("nothing to resume" in open(r.log).read() for r in records)


def test_each_seed_is_a_run_of_its_own(sample_root, make_cfg):
    from wbc.ops.jobs import job_specs

    overrides = path_overrides(make_cfg(sample_root))
    specs = job_specs([CONFIG], [0, 1], [3, 4], overrides)
    want = [(f"sample_tiny_cpu_seed{seed}", fold, seed) for seed in (3, 4) for fold in (0, 1)]
    assert [(s.run, s.fold, s.seed) for s in specs] == want
    assert specs[0].overrides[-2:] == ["seed=3", "name=sample_tiny_cpu_seed3"]
    assert [s.run for s in job_specs([CONFIG], [0], None, overrides)] == ["sample_tiny_cpu"]


def test_bad_executor_settings_are_one_line(tmp_path, monkeypatch):
    from wbc.core.errors import WBCError
    from wbc.ops.jobs import make_executor, parse_params

    assert parse_params("timeout_min=30 slurm_partition=gpu mem_gb=7.5") == {
        "timeout_min": 30, "slurm_partition": "gpu", "mem_gb": 7.5}
    with pytest.raises(WBCError, match="SLURM_ARGS: 'gpu' is not key=value"):
        parse_params("gpu")
    with pytest.raises(WBCError, match="^SLURM_ARGS: [^\n]*$"):
        make_executor("local", tmp_path / "jobs", {"no_such_parameter": 1})
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    with pytest.raises(WBCError, match="EXECUTOR=slurm: no `sbatch` on this machine"):
        make_executor("slurm", tmp_path / "jobs", {})


def test_make_train_jobs_passes_configs_folds_seeds_and_executor():
    r = make("-n", "train-jobs", "CONFIGS=configs/a.yaml configs/b.yaml", "FOLDS=0 1", "SEEDS=1 2", "EXECUTOR=local",
             "SLURM_ARGS=timeout_min=60 mem_gb=8")
    assert r.returncode == 0, r.stderr
    line = " ".join(r.stdout.replace("\\\n", " ").split())
    assert ("-m wbc train-jobs --configs configs/a.yaml,configs/b.yaml --fold 0,1 --seeds 1,2 --executor local "
            '--slurm-args "timeout_min=60 mem_gb=8"') in line, line
    r = make("train-jobs")
    assert r.returncode == 2 and "give CONFIGS=" in r.stderr
