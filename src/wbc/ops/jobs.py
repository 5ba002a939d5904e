"""Folds x configs x seeds as scheduler jobs through submitit (`make train-jobs`): a SLURM job array on a cluster, or
submitit's local executor on one machine (and in the tests).

Each job trains and predicts one fold of one config (and seed) with `fold_runner.run_folds`, the function
`train-fold` runs, in its own process: a job that fails does not stop the others. A job that SLURM times out or
preempts is requeued and resumes from its fold's `state.pt` (submitit calls `TrainJob.checkpoint`); a resubmission
with RESUME=1 skips the folds that finished and resumes the others. `<output_dir>/jobs/<time>/jobs.json` holds every
job's id, state and error, refreshed while the command watches them; submitit's pickles and logs lie beside it.
A seed runs as `seed=<s> name=<run>_seed<s>`, so each seed has its own run folder.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.config import config_path, display_path, load_config, resolve_path
from ..core.console import console, print_table
from ..core.errors import WBCError, first_line
from ..core.io import write_json

EXECUTORS = ("slurm", "local")
# A fold of a GPU recipe at 368 px takes hours; a job asks for one GPU (gpus_per_node=0 for CPU nodes).
DEFAULT_PARAMS = {"timeout_min": 24 * 60, "gpus_per_node": 1, "stderr_to_stdout": True, "name": "wbc"}


@dataclass
class JobSpec:
    config: str
    fold: int
    seed: int | None
    run: str  # the run folder's name
    overrides: list[str]


@dataclass
class JobRecord:
    config: str
    run: str
    fold: int
    seed: int | None
    job_id: str
    state: str = "submitted"  # submitted, then submitit's state while it runs, then done or failed
    error: str | None = None
    log: str | None = None
    job: object = field(default=None, repr=False)


class TrainJob:
    """What a scheduler job runs: one fold of one config, as `make train-fold` does. submitit pickles it; its
    `checkpoint` (called on a time-out or preemption) requeues the same fold with resume on."""

    def __call__(self, config: str, overrides: list[str], fold: int, resume: bool) -> dict:
        from .deadline import Deadline
        from .fold_runner import run_folds

        cfg = load_config(config, overrides)
        run_folds(cfg, config, overrides, [fold], resume, Deadline(), None)
        return {"run": cfg["name"], "fold": fold}

    def checkpoint(self, config: str, overrides: list[str], fold: int, resume: bool):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, config, overrides, fold, True)


def job_specs(configs: list[str], folds: list[int], seeds: list[int] | None, overrides: list[str]) -> list[JobSpec]:
    """One job per config x seed x fold; every config (and seed) resolved, so a bad one stops before any submission."""
    specs = []
    for config in configs:
        for seed in seeds or [None]:
            extra = []
            if seed is not None:
                name = load_config(config, overrides)["name"]
                extra = [f"seed={seed}", f"name={name}_seed{seed}"]
            cfg = load_config(config, [*overrides, *extra])
            specs += [JobSpec(config, fold, seed, cfg["name"], [*overrides, *extra]) for fold in folds]
    return specs


def parse_params(text: str | None) -> dict:
    """`SLURM_ARGS="timeout_min=600 slurm_partition=gpu"` as submitit parameters (values read as YAML scalars)."""
    import yaml

    params = {}
    for token in (text or "").split():
        key, eq, value = token.partition("=")
        if not eq or not key:
            raise WBCError(f"SLURM_ARGS: '{token}' is not key=value")
        params[key] = yaml.safe_load(value)
    return params


def make_executor(kind: str, folder: Path, params: dict):
    """submitit's AutoExecutor for `kind` with DEFAULT_PARAMS under `params`; a bad parameter is one line."""
    try:
        import submitit
    except ImportError:
        raise WBCError("train-jobs needs submitit: `make setup`, or pip install 'wbc[cluster]'") from None
    if kind not in EXECUTORS:
        raise WBCError(f"EXECUTOR={kind}: choose one of {', '.join(EXECUTORS)}")
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise WBCError("EXECUTOR=slurm: no `sbatch` on this machine (not a SLURM login node); EXECUTOR=local runs "
                       "the jobs here")
    ex = submitit.AutoExecutor(folder=folder, cluster=kind)
    try:
        ex.update_parameters(**{**DEFAULT_PARAMS, **params})
    except (NameError, ValueError, TypeError) as e:
        raise WBCError(f"SLURM_ARGS: {first_line(e)}") from None
    return ex


def train_jobs(configs: list[str], folds: list[int], seeds: list[int] | None, overrides: list[str], resume: bool,
               kind: str, params: dict, wait: bool = True, poll_s: float = 10.0) -> list[JobRecord]:
    """Submit a job per config x seed x fold, then (with `wait`) watch them to the end; raise if any failed."""
    specs = job_specs(configs, folds, seeds, overrides)
    out_dir = jobs_dir(resolve_path(load_config(configs[0], overrides)["output_dir"]) / "jobs")
    ex = make_executor(kind, out_dir, params)
    # config files by absolute path: a job may start in another folder
    jobs = ex.map_array(TrainJob(), [str(config_path(s.config).resolve()) for s in specs], [s.overrides for s in specs],
                        [s.fold for s in specs], [resume] * len(specs))
    records = [JobRecord(s.config, s.run, s.fold, s.seed, str(j.job_id), log=display_path(j.paths.stdout), job=j)
               for s, j in zip(specs, jobs)]
    console.print(f"train-jobs: {len(records)} {kind} job(s) submitted; their states: "
                  f"{display_path(out_dir / 'jobs.json')}")
    save(out_dir, records)
    if wait:
        watch(records, out_dir, poll_s)
    report(out_dir, records, finished=wait)
    return records


def jobs_dir(parent: Path) -> Path:
    """A new folder for this submission: its time, numbered when another submission took that second."""
    stamp, k = time.strftime("%Y%m%d-%H%M%S"), 1
    while (parent / (stamp if k == 1 else f"{stamp}-{k}")).exists():
        k += 1
    return parent / (stamp if k == 1 else f"{stamp}-{k}")


def watch(records: list[JobRecord], out_dir: Path, poll_s: float) -> None:
    """Poll until every job ended, naming each as it does, the summary file kept current. Ctrl-C stops the watching,
    not the jobs."""
    while True:
        changed = False
        for r in records:
            if r.state in ("done", "failed"):
                continue
            if r.job.done():
                r.state, r.error = outcome(r.job)
                console.print(f"job {r.job_id} ({r.run} fold {r.fold}): {r.state}"
                              + (f": {r.error}" if r.error else ""), highlight=False)
                changed = True
            elif r.job.state != r.state:
                r.state, changed = r.job.state, True
        if changed:
            save(out_dir, records)
        if all(r.state in ("done", "failed") for r in records):
            return
        time.sleep(poll_s)


def outcome(job) -> tuple[str, str | None]:
    """(done | failed, the error's last line) of an ended job."""
    e = job.exception()
    if e is None:
        return "done", None
    lines = [x for x in str(e).splitlines() if x.strip() and not x.startswith("---")]
    errors = [x for x in lines if ("Error" in x or "Reached" in x or "Exception" in x) and ": " in x]
    return "failed", (errors or lines or ["unknown error"])[-1].strip()


def save(out_dir: Path, records: list[JobRecord]) -> None:
    write_json(out_dir / "jobs.json", [{k: v for k, v in asdict(r).items() if k != "job"} for r in records])


def report(out_dir: Path, records: list[JobRecord], finished: bool) -> None:
    rows = [[r.job_id, r.run, r.fold, "-" if r.seed is None else r.seed, r.state, r.error or r.log or ""]
            for r in records]
    print_table(f"train-jobs ({display_path(out_dir)})", ["job", "run", "fold", "seed", "state", "error / log"], rows)
    save(out_dir, records)
    failed = [r for r in records if r.state == "failed"]
    if finished and failed:
        raise WBCError(f"train-jobs: {len(failed)} of {len(records)} job(s) failed "
                       f"({', '.join(f'{r.run} fold {r.fold}' for r in failed)}); logs under {display_path(out_dir)}")


def register(sub) -> None:
    import argparse
    import os

    from .cli import fold_list

    def int_list(text: str) -> list[int]:
        try:
            return [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"seeds are integers separated by commas, got '{text}'") from None

    p = sub.add_parser("train-jobs", help="one scheduler job per config x fold [x seed] through submitit")
    p.add_argument("--configs", required=True, type=lambda text: [c for c in text.split(",") if c],
                   help="experiment YAMLs separated by commas")
    p.add_argument("--fold", type=fold_list, required=True, help="folds, e.g. 0,1,2,3,4")
    p.add_argument("--seeds", type=int_list, default=None,
                   help="seeds, e.g. 1,2: each a run of its own, <run>_seed<s> (default: the config's seed)")
    p.add_argument("--executor", choices=EXECUTORS, default="slurm",
                   help="slurm: a SLURM job array (sbatch); local: processes on this machine")
    p.add_argument("--slurm-args", default=None,
                   help="submitit parameters as key=value separated by spaces, e.g. 'timeout_min=600 "
                        "slurm_partition=gpu slurm_array_parallelism=8' (timeout_min, gpus_per_node, cpus_per_task, "
                        "mem_gb apply to the local executor too)")
    p.add_argument("--resume", action="store_true", default=os.environ.get("RESUME") == "1",
                   help="skip finished folds and resume the others from their state.pt (also RESUME=1)")
    p.add_argument("--no-wait", action="store_true",
                   help="return once the jobs are submitted (their states: squeue / sacct, or `make runs`)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every job")

    def run(args):
        train_jobs(args.configs, args.fold, args.seeds, args.overrides, args.resume, args.executor,
                   parse_params(args.slurm_args), wait=not args.no_wait)

    p.set_defaults(func=run)
