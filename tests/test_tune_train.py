"""tune-train: an Optuna study whose trials are (here: fake, deterministic) fold trainings, with pruning on
per-epoch validation macro-F1, resume, and parallel workers sharing one journal file."""
from __future__ import annotations

import json
import multiprocessing as mp
from operator import attrgetter

import optuna
import pytest

from wbc.__main__ import main
from wbc.core.config import load_config
from wbc.core.errors import WBCError
from wbc.optional import tune_train
from wbc.optional.tune_train import load_study_config, run_tune_train

EPOCHS = 5
STUDY = {
    "n_trials": 10,
    "n_startup_trials": 3,
    "seed": 0,
    "fold": 1,
    "epochs": EPOCHS,
    "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    "fixed": {"train.sampler.type": "power"},
    "search_space": {
        "train.loss.class_weight_power": {"type": "float", "low": 0.0, "high": 1.0},
        "train.loss.type": {"type": "categorical", "choices": ["ce", "focal"]},
        "train.loss.focal_gamma": {"type": "float", "low": 0.5, "high": 3.0, "when": {"train.loss.type": "focal"}},
        "augment.strength": {"type": "float", "low": 0.3, "high": 1.5},
    },
}


def quality(cfg: dict) -> float:
    """The fake model's final macro-F1: best at class_weight_power 0.3, focal gamma 1, strength 1."""
    q = 0.9 - (cfg["train"]["loss"]["class_weight_power"] - 0.3) ** 2 - 0.2 * (cfg["augment"]["strength"] - 1) ** 2
    if cfg["train"]["loss"]["type"] == "focal":
        q += 0.05 - 0.05 * (cfg["train"]["loss"]["focal_gamma"] - 1.0) ** 2
    return q


def fake_train_fold(cfg: dict, fold: int, on_epoch=None) -> dict:
    """Deterministic stand-in for wbc.s3_train.loop.train_fold: rising val macro-F1 towards `quality`."""
    assert fold == STUDY["fold"] and cfg["train"]["sampler"]["type"] == "power"
    assert cfg["train"]["epochs"] == EPOCHS and cfg["name"].startswith("tt_") and cfg["predict"]["tta"] == 1
    best = 0.0
    for epoch in range(cfg["train"]["epochs"]):
        f1 = quality(cfg) * (1 - 0.5 ** (epoch + 1))
        best = max(best, f1)
        on_epoch(epoch, {"val_macro_f1": f1, "val_loss": 1.0 / (epoch + 1)})  # a loss that says nothing of F1
    return {"fold": fold, "best_macro_f1": best}


def _run(tmp_path, n_trials, storage=None, **kw):
    return run_tune_train(None, [f"output_dir={tmp_path / 'out'}"], STUDY, n_trials=n_trials, study_name="tt",
                          storage=storage or f"journal:{tmp_path / 'tt.journal'}", train_fn=fake_train_fold, **kw)


def test_trials_prune_resume_and_record_results(tmp_path, monkeypatch):
    monkeypatch.setenv("WBC_WORKER", "w0")  # the worker tag seeds the sampler
    study = _run(tmp_path, 10)
    trials = study.trials
    assert len(trials) == 10 and [t.number for t in trials] == list(range(10))
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and complete and len(pruned) + len(complete) == 10
    assert all(len(t.intermediate_values) == EPOCHS for t in complete)
    assert all(len(t.intermediate_values) < EPOCHS for t in pruned)  # stopped early: the point of pruning
    for t in complete:  # the trial's value is the training's best macro-F1 for the sampled config
        cfg = {"train": {"loss": {"class_weight_power": t.params["train.loss.class_weight_power"],
                                  "type": t.params["train.loss.type"],
                                  "focal_gamma": t.params.get("train.loss.focal_gamma", 0.0)}},
               "augment": {"strength": t.params["augment.strength"]}}
        assert t.value == pytest.approx(quality(cfg) * (1 - 0.5 ** EPOCHS))
        # pruning watches the per-epoch validation macro-F1, not the loss
        assert t.intermediate_values == pytest.approx({e: quality(cfg) * (1 - 0.5 ** (e + 1)) for e in range(EPOCHS)})
    # focal gamma is sampled only for focal trials
    assert all(("train.loss.focal_gamma" in t.params) == (t.params["train.loss.type"] == "focal") for t in trials)
    assert len({t.user_attrs["run"] for t in trials}) == 10

    resumed = _run(tmp_path, 16)
    assert len(resumed.trials) == 16
    key = attrgetter("number", "params", "state")
    assert [key(t) for t in resumed.trials[:10]] == [key(t) for t in trials]
    assert len(_run(tmp_path, 16).trials) == 16  # at its budget: nothing more

    out = tmp_path / "out" / "tune_train" / "tt"
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == pytest.approx(resumed.best_value)
    assert "train.sampler.type=power" in best["overrides"]
    assert f"train.loss.class_weight_power={best['params']['train.loss.class_weight_power']}" in best["overrides"]
    assert len((out / "trials.csv").read_text().splitlines()) == 17
    # best.yaml: the training config with the winner, ready for `make train-all predict CONFIG=...`
    cfg = load_config(out / "best.yaml")
    assert cfg["name"] == "tt_best" and cfg["output_dir"] == str(tmp_path / "out")
    assert cfg["train"]["sampler"]["type"] == "power"
    assert cfg["train"]["loss"]["class_weight_power"] == best["params"]["train.loss.class_weight_power"]
    assert cfg["augment"]["strength"] == best["params"]["augment.strength"]
    defaults = load_config()  # the recipe's epochs and TTA, not a trial's
    assert cfg["train"]["epochs"] == defaults["train"]["epochs"] != EPOCHS
    assert cfg["predict"]["tta"] == defaults["predict"]["tta"] != 1
    assert "best trial" in (out / "best.yaml").read_text().splitlines()[0]


def _worker(tmp_path, tag):
    import os

    os.environ["WBC_WORKER"] = tag
    _run(tmp_path, 12)


def test_parallel_workers_share_the_journal(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(tmp_path, f"gpu{i}")) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    study = optuna.load_study(study_name="tt", storage=tune_train.make_storage(f"journal:{tmp_path / 'tt.journal'}"))
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = [t for t in study.trials if t.state in done]
    assert 12 <= len(finished) <= 13  # the total budget is shared; a worker may finish one trial in flight
    assert {t.user_attrs["worker"] for t in finished} == {"gpu0", "gpu1"}
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    # differently seeded workers do not repeat each other's trials
    params = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(params)) == len(params)


def test_cli_and_bad_study_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WBC_WORKER", "w0")
    monkeypatch.setattr(tune_train, "_default_train_fn", lambda: fake_train_fold)
    cfg_file = tmp_path / "study.yaml"
    cfg_file.write_text(json.dumps(STUDY))  # JSON is YAML
    storage = f"sqlite:///{tmp_path / 'tt.db'}"
    argv = ["tune-train", "--study-config", str(cfg_file), "--storage", storage, "--n-trials", "4",
            "--study-name", "tt", f"output_dir={tmp_path / 'out'}"]
    assert main(argv) == 0
    study = optuna.load_study(study_name="tt", storage=storage)
    assert len(study.trials) == 4 and study.trials[0].user_attrs["run"] == "tt_t0000"

    bad = dict(STUDY, search_space={"train.loss.focal_gama": {"type": "float", "low": 0, "high": 1}})
    with pytest.raises(WBCError, match="'train.loss.focal_gama' is not a key of the training config"):
        run_tune_train(None, [], bad, storage=storage, train_fn=fake_train_fold)
    cfg_file.write_text(json.dumps(dict(STUDY, n_trails=3)))
    with pytest.raises(WBCError, match="unknown key\\(s\\) n_trails"):
        load_study_config(cfg_file)
    assert main(argv[:1] + ["--study-config", str(cfg_file)]) == 2
    assert "unknown key(s) n_trails" in capsys.readouterr().out


def test_baseline_runs_first_and_the_gain_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("WBC_WORKER", "w0")
    baseline = {"train.loss.class_weight_power": 0.9, "train.loss.type": "ce", "augment.strength": 1.0}
    study = run_tune_train(None, [f"output_dir={tmp_path / 'out'}"], dict(STUDY, baseline=baseline), n_trials=8,
                           study_name="tt", storage=f"journal:{tmp_path / 'tb.journal'}", train_fn=fake_train_fold)
    first = study.trials[0]
    assert first.params == baseline and first.user_attrs["baseline"] is True
    base_value = quality({"train": {"loss": {"class_weight_power": 0.9, "type": "ce"}},
                          "augment": {"strength": 1.0}}) * (1 - 0.5 ** EPOCHS)
    assert first.value == pytest.approx(base_value)
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1
    best = json.loads((tmp_path / "out" / "tune_train" / "tt" / "best.json").read_text())
    assert best["baseline"]["number"] == 0 and best["baseline"]["value"] == pytest.approx(base_value)
    assert best["gain_over_baseline"] == pytest.approx(study.best_value - base_value) and best["gain_over_baseline"] > 0

    for bad, msg in (({"train.loss.tau": 1.0}, "'train.loss.tau' is not a key of the search space"),
                     ({"augment.strength": 3.0}, "augment.strength=3.0 lies outside its search space"),
                     ({"train.loss.type": "lsce"}, "train.loss.type=lsce lies outside")):
        with pytest.raises(WBCError, match=msg):
            run_tune_train(None, [], dict(STUDY, baseline=bad), storage=f"journal:{tmp_path / 'x.journal'}",
                           train_fn=fake_train_fold)


def test_a_diverged_trial_is_pruned_and_the_study_goes_on(tmp_path, monkeypatch):
    """Trials with augment.strength above 1.2 blow up after two epochs: each is recorded as pruned, with the
    reason, and the study still reaches its budget."""
    from wbc.core.errors import TrainingDiverged

    monkeypatch.setenv("WBC_WORKER", "w0")

    def unstable(cfg, fold, on_epoch=None):
        if cfg["augment"]["strength"] > 1.2:
            on_epoch(0, {"val_macro_f1": 0.98})  # above every other trial: never pruned early
            on_epoch(1, {"val_macro_f1": 0.99})
            raise TrainingDiverged(f"{cfg['name']}: epoch 2: training diverged")
        return fake_train_fold(cfg, fold, on_epoch)

    study = run_tune_train(None, [f"output_dir={tmp_path / 'out'}"], STUDY, n_trials=10, study_name="tt",
                           storage=f"journal:{tmp_path / 'td.journal'}", train_fn=unstable)
    diverged = [t for t in study.trials if t.params["augment.strength"] > 1.2]
    assert len(study.trials) == 10 and diverged
    for t in diverged:
        assert t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values == {0: 0.98, 1: 0.99}
        assert t.user_attrs["diverged"] == f"tt_t{t.number:04d}: epoch 2: training diverged"
    assert all(t.state != optuna.trial.TrialState.FAIL for t in study.trials)
