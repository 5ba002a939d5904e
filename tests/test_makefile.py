"""The Makefile's own logic: every target documented in `make help`, `bundle` packs predictions without checkpoints,
`benchmark-pbcbench` chains members, ensembles and refinement."""
import re
import tarfile

import pytest

from helpers import ROOT, make, write_folds


def test_help_lists_every_phony_target():
    text = (ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*?)(?<!\\)\n", text, re.S | re.M).group(1).replace("\\", " ").split())
    text = re.sub(r"\x1b\[[0-9;]*m", "", make("help").stdout)
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  ")}
    assert phony == listed
    sections = [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert sections[0].startswith("Set-up") and sections[1].startswith("The main path: data -> folds -> train")


def test_a_target_before_setup_says_to_run_setup(tmp_path):
    r = make(f"PY={tmp_path / 'no-venv' / 'python'}", "folds")
    assert r.returncode != 0 and "run `make setup` first" in r.stderr
    assert make(f"PY={tmp_path / 'no-venv' / 'python'}", "help").returncode == 0


@pytest.mark.slow
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
    expected = []
    for m in ["convnext_tiny_scratch", "swin_tiny_scratch", "effnet_lite0"]:
        expected += [f"train-fold -c configs/recipes/{m}.yaml --fold 0,1,2,3,4", f"predict -c configs/recipes/{m}.yaml",
                     f"submit -c configs/recipes/{m}.yaml"]
    # a specialist predicts only its classes: trained and predicted, never submitted alone
    expected += ["train-fold -c configs/recipes/convnext_tiny_gran_scratch.yaml --fold 0,1,2,3,4",
                 "predict -c configs/recipes/convnext_tiny_gran_scratch.yaml"]
    expected += ["ensemble -c configs/experiments/pbcbench/ensemble/ensemble.yaml",
                 "ensemble -c configs/experiments/pbcbench/ensemble/scratch.yaml",
                 "ensemble -c configs/experiments/pbcbench/ensemble/ensemble_specialist.yaml",
                 "morph -c configs/steps/refine.yaml",
                 "refine -c configs/steps/refine.yaml --pred outputs/ensemble/pbcbench_ensemble"]
    steps = [line.split(" -m wbc ", 1)[1].replace('"', "") for line in lines if "convert-effnet" not in line]
    assert len(steps) == len(expected)
    for step, want in zip(steps, expected):
        assert step.startswith(want) and "data.root=/bench" in step, (step, want)
    assert "refine.submission_name=pbcbench_ensemble_refined" in steps[-1]
    for path in re.findall(r"configs/\S+\.yaml", "\n".join(steps)):
        assert (ROOT / path).is_file(), path


def test_best_cpu_reproduces_the_best_pipeline_with_its_seed_overrides():
    r = make("best-cpu")
    assert r.returncode != 0 and "give DATA=" in r.stderr
    cpu = " ".join(make("-n", "best-cpu", "DATA=/bench").stdout.replace('"', "").split())
    x = "configs/experiments/pbcbench"
    assert f"train-fold -c {x}/effnet_lite0_cpu_e16.yaml --fold 0,1,2,3,4 data.root=/bench" in cpu
    assert f"predict -c {x}/effnet_lite0_cpu_e16_last.yaml data.root=/bench" in cpu  # its last weights
    assert (f"train-fold -c {x}/effnet_lite0_cpu_e16.yaml --fold 0,1,2,3,4 data.root=/bench seed=2 "
            "predict.weights=last name=pbcbench_effnet_lite0_cpu_e16_seed2") in cpu  # a seed group's second run
    assert (f"train-fold -c {x}/effnet_lite1_cpu_e16.yaml --fold 0,1,2,3,4 data.root=/bench seed=8 "
            "name=pbcbench_effnet_lite1_cpu_e16_seed2") in cpu
    assert "ensemble -c configs/ensemble/pbcbench_best.yaml data.root=/bench" in cpu
    for path in re.findall(r"configs/\S+\.yaml", cpu):
        assert (ROOT / path).is_file(), path


@pytest.mark.slow
def test_train_bundle_stops_at_the_time_limit_and_still_bundles(sample_root, make_cfg, tmp_path):
    """`make train-bundle` (one time-boxed call on a lent GPU): every config's folds under one deadline, training
    stops itself at an epoch's end (exit 75, later configs not started), and whatever ran is bundled after it."""

    cfg = make_cfg(sample_root, "folds.n_folds=2")
    write_folds(cfg)
    args = (f"data.root={sample_root} output_dir={cfg['output_dir']} data.cache_dir={cfg['data']['cache_dir']} "
            f"folds.file={cfg['folds']['file']} folds.n_folds=2 data.image_size=32 train.epochs=3 predict.tta=1")
    dest = tmp_path / "b"
    r = make("train-bundle", "CONFIGS=configs/recipes/tiny_cpu.yaml configs/recipes/tiny_cpu_b.yaml", "FOLDS=0 1",
             "TIME_LIMIT=0", f"DEST={dest}", f"ARGS={args}")
    assert r.returncode != 0 and "Error 75" in r.stderr and "stopped after epoch 0" in r.stdout, r.stderr
    with tarfile.open(dest / "sample_tiny_cpu.tar.gz") as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
        metrics = t.extractfile("sample_tiny_cpu/fold0/metrics.jsonl").read().decode().splitlines()
    assert "sample_tiny_cpu/fold0/oof.csv" not in names and len(metrics) == 1
    assert not (dest / "sample_tiny_cpu_b.tar.gz").exists()  # never started

    r = make("train-bundle", "CONFIGS=configs/recipes/tiny_cpu.yaml", "FOLDS=0", "TIME_LIMIT=600", f"DEST={dest}",
             f"ARGS={args}", "RESUME=1")
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout
    with tarfile.open(dest / "sample_tiny_cpu.tar.gz") as t:
        assert len(t.extractfile("sample_tiny_cpu/fold0/metrics.jsonl").read().decode().splitlines()) == 3
        assert "sample_tiny_cpu/fold0/oof.csv" in {m.name for m in t.getmembers()}
    r = make("train-bundle", "CONFIGS=configs/recipes/tiny_cpu.yaml")
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
