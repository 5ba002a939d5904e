"""`runs`: the table of runs and ensembles reads what the steps wrote: finished and unfinished folds, scores."""
import json
import os

import pytest
import yaml

from wbc.ops.runs import show_runs


def _finished_fold(d, stamp=1_000_000):
    d.mkdir(parents=True)
    for name in ("env.json", "metrics.jsonl"):
        (d / name).write_text("{}\n" * 4)
        os.utime(d / name, (stamp, stamp))
    for name in ("train_result.json", "oof.csv"):
        (d / name).write_text("x")
        os.utime(d / name, (stamp + 1, stamp + 1))


def test_runs_lists_folds_scores_and_ensembles(tmp_path, capsys):
    run = tmp_path / "convnext"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "convnext_tiny"}, "folds": {"n_folds": 3},
                                                     "train": {"epochs": 3, "stage2": {"epochs": 1}}}))
    _finished_fold(run / "fold0")
    (run / "fold1").mkdir()
    (run / "fold1" / "metrics.jsonl").write_text("{}\n{}\n")  # stopped after two of four epochs
    (run / "report.json").write_text(json.dumps({"oof": {"macro_f1": 0.5}, "oof_complete": False,
                                                 "eval": {"macro_f1": 0.4}}))
    other = tmp_path / "lite0"
    other.mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump({"folds": {"n_folds": 3}, "train": {"epochs": 2}}))
    (other / "report.json").write_text(json.dumps({"oof": {"macro_f1": 0.7}, "oof_complete": True}))
    ens = tmp_path / "ensemble" / "blend2"
    ens.mkdir(parents=True)
    (ens / "report.json").write_text(json.dumps({
        "final_step": "tuned", "members": [{"name": "a"}, {"name": "b"}], "folds": [0, 1],
        "scores": {"oof": {"blend": {"macro_f1": 0.6}, "tuned": {"macro_f1": 0.8}}, "oof_nested": 0.75,
                   "oof_nested_blend": 0.6, "eval": {"tuned": {"macro_f1": 0.7}}},
        "submission": "submissions/blend2.csv"}))
    (tmp_path / "bundles").mkdir()  # not a run: no config.yaml
    (tmp_path / "restorer").mkdir()  # not a classifier run: no folds, no report
    (tmp_path / "restorer" / "config.yaml").write_text(yaml.safe_dump({"restorer": {"epochs": 2}}))
    emb = tmp_path / "embed_tiny"  # an embedding run counts its own epochs
    (emb / "fold0").mkdir(parents=True)
    (emb / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 8}, "embed": {"epochs": 6}}))
    (emb / "fold0" / "metrics.jsonl").write_text("{}\n" * 3)
    trial = tmp_path / "study_t0001"  # a tune-train trial: trained and scored, checkpoints deleted
    _finished_fold(trial / "fold0")
    (trial / "fold0" / "oof.csv").unlink()
    (trial / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 4}}))

    rows = show_runs(tmp_path)
    out = capsys.readouterr().out
    assert [r["name"] for r in rows] == ["convnext", "embed_tiny", "lite0", "study_t0001", "blend2"]
    conv, emb_row, lite, trial_row, blend = rows
    assert emb_row["unfinished"] == {0: "3/6 epochs"} and trial_row["unfinished"] == {0: "trained, not predicted"}
    assert conv["folds_done"] == [0] and conv["unfinished"] == {1: "2/4 epochs"} and conv["arch"] == "convnext_tiny"
    assert conv["oof_macro_f1"] == 0.5 and conv["eval_macro_f1"] == 0.4 and conv["oof_complete"] is False
    assert lite["folds_done"] == [] and lite["oof_macro_f1"] == 0.7
    assert blend["kind"] == "ensemble (tuned)" and blend["oof_macro_f1"] == 0.8 and blend["nested_macro_f1"] == 0.75
    assert blend["eval_macro_f1"] == 0.7 and blend["folds_done"] == [0, 1] and blend["submission"].endswith(".csv")
    assert "1 of 3 (0); 1: 2/4 ep" in out and "0.5000 part" in out and "ensemble/blend2" in out
    assert out.index("ensemble/blend2") < out.index("convnext")  # best OOF first
    assert json.loads((tmp_path / "runs.json").read_text())[0]["name"] == "convnext"


def test_damaged_run_files_and_a_missing_folder(tmp_path):
    """An ensemble report that is no object is left blank; a config.yaml that is no YAML, or a folder that is not
    there, is one line naming it."""
    from wbc.core.errors import WBCError

    (tmp_path / "ensemble" / "odd").mkdir(parents=True)
    (tmp_path / "ensemble" / "odd" / "report.json").write_text("[1, 2]")
    assert show_runs(tmp_path) == []
    _finished_fold(tmp_path / "broken" / "fold0")
    (tmp_path / "broken" / "config.yaml").write_text("train: [1,")
    with pytest.raises(WBCError, match=r"broken/config.yaml: invalid YAML"):
        show_runs(tmp_path)
    with pytest.raises(WBCError, match=r"nowhere: no such folder"):
        show_runs(tmp_path / "nowhere")


def test_a_config_with_a_bad_epoch_count_shows_unknown_epochs(tmp_path):
    run = tmp_path / "edited"
    (run / "fold0").mkdir(parents=True)
    (run / "fold0" / "metrics.jsonl").write_text("{}\n")
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": "abc"}}))
    assert show_runs(tmp_path)[0]["unfinished"] == {0: "1/? epochs"}
