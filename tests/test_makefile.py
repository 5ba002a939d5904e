"""The Makefile's own logic: every target documented in `make help`, `bundle` packs predictions without checkpoints,
`benchmark-pbcbench` chains members, ensembles and refinement."""
import os
import re
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("WBC_DATA", "MAKEFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, env=env)


def test_help_lists_every_phony_target():
    text = (ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*?)(?<!\\)\n", text, re.S | re.M).group(1).replace("\\", " ").split())
    text = re.sub(r"\x1b\[[0-9;]*m", "", make("help").stdout)
    listed = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert phony == listed


def test_bundle_packs_a_run_without_checkpoints(tmp_path):
    run = tmp_path / "outputs" / "myrun"
    (run / "fold0").mkdir(parents=True)
    for name in ("fold0/best.pt", "fold0/state.pt", "fold0/oof.csv", "fold0/metrics.jsonl", "oof.csv", "report.json",
                 "config.yaml"):
        (run / name).write_text("x")
    r = make("bundle", f"RUN={run}", f"DEST={tmp_path / 'b'}")
    assert r.returncode == 0, r.stderr
    with tarfile.open(tmp_path / "b" / "myrun.tar.gz") as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
    assert names == {"myrun/fold0/oof.csv", "myrun/fold0/metrics.jsonl", "myrun/oof.csv", "myrun/report.json",
                     "myrun/config.yaml"}
    r = make("bundle", f"RUN={tmp_path / 'nope'}", f"DEST={tmp_path / 'b'}")
    assert r.returncode != 0 and "not a run folder" in r.stdout
    r = make("bundle", f"DEST={tmp_path / 'b'}")  # no RUN: not the whole repository
    assert r.returncode == 2 and "give RUN=" in r.stderr
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["myrun.tar.gz"]  # no temporary file left


def test_benchmark_pbcbench_chains_members_ensembles_and_refinement():
    r = make("benchmark-pbcbench")
    assert r.returncode != 0 and "give DATA=" in r.stderr
    r = make("-n", "benchmark-pbcbench", "DATA=/bench")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if " -m wbc " in line]
    members = ["pbcbench_convnext_tiny", "pbcbench_swin_tiny", "pbcbench_effnet_lite0"]
    expected = []
    for m in members:
        expected += [f"train-fold -c configs/{m}.yaml --fold 0,1,2,3,4", f"predict -c configs/{m}.yaml",
                     f"submit -c configs/{m}.yaml --name {m}"]
    # a specialist predicts only its classes: trained and predicted, never submitted alone
    expected += ["train-fold -c configs/pbcbench_convnext_tiny_gran.yaml --fold 0,1,2,3,4",
                 "predict -c configs/pbcbench_convnext_tiny_gran.yaml"]
    expected += ["ensemble -c configs/ensemble/pbcbench_ensemble.yaml",
                 "ensemble -c configs/ensemble/pbcbench_scratch.yaml",
                 "ensemble -c configs/ensemble/pbcbench_ensemble_specialist.yaml",
                 "morph -c configs/refine.yaml",
                 "refine -c configs/refine.yaml --pred outputs/ensemble/pbcbench_ensemble"]
    steps = [line.split(" -m wbc ", 1)[1].replace('"', "") for line in lines if "convert-effnet" not in line]
    assert len(steps) == len(expected)
    for step, want in zip(steps, expected):
        assert step.startswith(want) and "data.root=/bench" in step, (step, want)
    assert "refine.submission_name=pbcbench_ensemble_refined" in steps[-1]
    for path in re.findall(r"configs/\S+\.yaml", "\n".join(steps)):
        assert (ROOT / path).is_file(), path
    cpu = make("-n", "benchmark-pbcbench", "DATA=/bench", "BENCH=cpu").stdout.replace('"', "")
    assert "train-fold -c configs/pbcbench_effnet_lite1_cpu_e16.yaml" in cpu
    assert "predict -c configs/pbcbench_effnet_lite0_cpu_e16_last.yaml" in cpu  # its members' last weights
    assert "train-fold -c configs/pbcbench_effnet_lite1_cpu_e16_seed2.yaml" in cpu  # a seed group's second run
    assert "ensemble -c configs/ensemble/pbcbench_cpu_e16_seeds.yaml" in cpu
    assert "--pred outputs/ensemble/pbcbench_cpu_e16_seeds " in cpu


def test_train_bundle_stops_at_the_time_limit_and_still_bundles(sample_root, make_cfg, tmp_path):
    """`make train-bundle` (one time-boxed call on a lent GPU): every config's folds under one deadline, training
    stops itself at an epoch's end (exit 75, later configs not started), and whatever ran is bundled after it."""
    from wbc.folds import build_folds
    from wbc.io import write_csv

    cfg = make_cfg(sample_root, "folds.n_folds=2")
    write_csv(cfg["folds"]["file"], build_folds(cfg))
    args = (f"data.root={sample_root} output_dir={cfg['output_dir']} data.cache_dir={cfg['data']['cache_dir']} "
            f"folds.file={cfg['folds']['file']} folds.n_folds=2 data.image_size=32 train.epochs=3 predict.tta=1")
    dest = tmp_path / "b"
    r = make("train-bundle", "CONFIGS=configs/tiny_cpu.yaml configs/tiny_cpu_b.yaml", "FOLDS=0 1", "TIME_LIMIT=0",
             f"DEST={dest}", f"ARGS={args}")
    assert r.returncode != 0 and "Error 75" in r.stderr and "stopped after epoch 0" in r.stdout, r.stderr
    with tarfile.open(dest / "tiny_cpu.tar.gz") as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
        metrics = t.extractfile("tiny_cpu/fold0/metrics.jsonl").read().decode().splitlines()
    assert "tiny_cpu/fold0/oof.csv" not in names and len(metrics) == 1
    assert not (dest / "tiny_cpu_b.tar.gz").exists()  # never started

    r = make("train-bundle", "CONFIGS=configs/tiny_cpu.yaml", "FOLDS=0", "TIME_LIMIT=600", f"DEST={dest}",
             f"ARGS={args}", "RESUME=1")
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout
    with tarfile.open(dest / "tiny_cpu.tar.gz") as t:
        assert len(t.extractfile("tiny_cpu/fold0/metrics.jsonl").read().decode().splitlines()) == 3
        assert "tiny_cpu/fold0/oof.csv" in {m.name for m in t.getmembers()}
    r = make("train-bundle", "CONFIGS=configs/tiny_cpu.yaml")
    assert r.returncode == 2 and "TIME_LIMIT=<seconds>" in r.stderr


def test_paths_with_spaces_reach_the_commands_whole(sample_root, tmp_path):
    import shutil

    data = tmp_path / "my data"
    shutil.copytree(sample_root, data)
    folds = tmp_path / "my folds.csv"
    r = make("folds", f"DATA={data}", f"ARGS=folds.file='{folds}'")
    assert r.returncode == 0, r.stdout + r.stderr
    assert folds.is_file() and "labels,fold" in folds.read_text().splitlines()[0]


def test_targets_name_the_variable_they_need():
    for target, var in [("classify", "IMAGES="), ("check-submission", "FILE="), ("unbundle", "BUNDLES="),
                        ("shift", "RUNS="), ("pseudo-label", "PRED="), ("label-issues", "PRED="), ("bundle", "RUN=")]:
        r = make(target)
        assert r.returncode == 2 and f"{target}: give {var}" in r.stderr, (target, r.stderr)
