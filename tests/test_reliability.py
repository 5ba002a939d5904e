"""No silent wrong results, no tracebacks, no stray files, bounded memory: the cases of an adversarial pass over the
commands, each one line naming file (and row) or a refusal that leaves nothing mixed behind."""
import errno
import json
import struct
import zlib

import numpy as np
import pandas as pd
import pytest

from helpers import edit_csv, write_folds
from wbc.__main__ import main
from wbc.core.errors import WBCError


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, (out.out + out.err).strip()


def one_error(code, text, *needles):
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in text, text
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def cli_cfg(cfg) -> list[str]:
    d = cfg["data"]
    return ["-c", "configs/recipes/tiny_cpu.yaml", f"data.root={d['root']}", f"output_dir={cfg['output_dir']}",
            f"data.cache_dir={d['cache_dir']}", f"folds.file={cfg['folds']['file']}"]


# ---------------------------------------------------------------- 1. the dataset's classes are declared once

def test_a_stray_label_never_becomes_a_class(capsys, data_copy, make_cfg, tmp_path):
    """`XX` put into phase2_train.csv after the folds (and the classes) were written: `make folds` again, training
    and `check-submission` refuse it, naming file and row; before, it became a ninth class with a warning."""
    cfg = write_folds(make_cfg(data_copy))
    declared = json.loads((tmp_path / "folds.json").read_text())["classes"]
    edit_csv(data_copy / "phase2_train.csv", lambda d: d.assign(labels=["XX"] + list(d["labels"][1:])))
    code, text = run_cli(capsys, "folds", *cli_cfg(cfg))
    one_error(code, text, "phase2_train.csv:2", "unknown label 'XX'", ", ".join(declared))
    from wbc.s3_train.inputs import load_fold_data

    with pytest.raises(WBCError, match=r"phase2_train.csv:2: unknown label 'XX'"):
        load_fold_data(cfg)
    test_ids = pd.read_csv(data_copy / "phase2_test.csv", dtype=str)["ID"]
    sub = tmp_path / "sub.csv"
    pd.DataFrame({"ID": test_ids, "labels": ["XX"] + [declared[0]] * (len(test_ids) - 1)}).to_csv(sub, index=False)
    code, text = run_cli(capsys, "check-submission", *cli_cfg(cfg), "--file", sub)
    one_error(code, text, "sub.csv:2", "'XX' is not a class code")


def test_the_declaration_is_written_with_the_folds_and_read_by_later_steps(data_copy, make_cfg, tmp_path):
    from wbc.s1_data.layout import class_list

    cfg = write_folds(make_cfg(data_copy))
    found = json.loads((tmp_path / "folds.json").read_text())
    assert found["classes"] == class_list(cfg) and sum(found["images"].values()) == len(pd.read_csv(tmp_path /
                                                                                                   "folds.csv"))
    (tmp_path / "folds.json").write_text(json.dumps({"classes": found["classes"][:-1]}))  # one class less
    assert class_list(cfg) == found["classes"][:-1]  # the declaration, not what the data holds, decides
    (tmp_path / "folds.json").write_text("{not json")
    with pytest.raises(WBCError, match=r"folds.json: not a readable class declaration"):
        class_list(cfg)


# ---------------------------------------------------------------- 2. a resume trains with the config it started with

@pytest.mark.slow
def test_a_resume_with_another_training_config_is_refused(cfg2):
    from wbc.s3_train.loop import StopTraining, train_fold

    cfg = cfg2("train.epochs=2", "train.lr=0.003", "name=r")

    def kill(epoch, rec):
        raise StopTraining

    with pytest.raises(StopTraining):
        train_fold(cfg, 0, on_epoch=kill)
    with pytest.raises(WBCError, match=r"fold0: RESUME with another training config \(train\.lr 0\.003 -> 0\.3\)"):
        train_fold(cfg2("train.epochs=2", "train.lr=0.3", "name=r"), 0, resume=True)
    # a fold started before a key existed (here augment.lab) trained as the key's default says
    import yaml

    from wbc.core.run_folder import run_dir
    saved = run_dir(cfg) / "fold0" / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["augment"]["lab"]
    saved.write_text(yaml.safe_dump(old))
    with pytest.raises(WBCError, match=r"augment\.lab\.gray_p 0\.0 -> 0\.5"):  # but not as another value
        train_fold(cfg2("train.epochs=2", "train.lr=0.003", "name=r", "augment.lab.gray_p=0.5"), 0, resume=True)
    # where things are and how fast they load do not change what is learnt
    res = train_fold(cfg2("train.epochs=2", "train.lr=0.003", "name=r", "train.num_workers=1"), 0, resume=True)
    assert len(res["history"]) == 2


# ---------------------------------------------------------------- 3. a step's outputs change together

def test_a_killed_step_leaves_no_mixed_set_and_readers_refuse_it(tmp_path, monkeypatch):
    from wbc.core import run_folder
    from wbc.core.io import Probs, save_probs
    from wbc.s4_predict.merge import merge_run
    from wbc.s5_ensemble.blend import load_member

    run = tmp_path / "run"
    for k in (0, 1):
        save_probs(run / f"fold{k}" / "oof.csv", Probs([f"a{k}", f"b{k}"], np.array([[0.9, 0.1], [0.2, 0.8]]),
                                                       ["A", "B"], [k, k], ["A", "B"]))
        save_probs(run / f"fold{k}" / "test.csv", Probs(["t1"], np.array([[0.5, 0.5]]), ["A", "B"]))
    merge_run(run)
    old_test = (run / "test.csv").read_text()
    save_probs(run / "fold1" / "test.csv", Probs(["t1"], np.array([[0.1, 0.9]]), ["A", "B"]))

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("wbc.s4_predict.merge.save_confusion_png", killed)  # killed after the new oof.csv
    with pytest.raises(KeyboardInterrupt):
        merge_run(run)
    assert (run / run_folder.WRITING).exists() and not (run / "test.csv").exists()  # the old test.csv is gone too
    with pytest.raises(WBCError, match=r"run: its outputs are incomplete .* run `make predict` again"):
        load_member(run)
    monkeypatch.undo()
    merge_run(run)
    assert not (run / run_folder.WRITING).exists() and (run / "test.csv").read_text() != old_test
    assert load_member(run).test.ids.tolist() == ["t1"]


# ---------------------------------------------------------------- 4. image size bounded before decoding

def png_header_only(path, width, height):
    """A PNG that declares width x height and holds one tiny IDAT: its header is all a reader sees first."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [30000, 40000])
def test_an_image_too_large_to_decode_is_refused_by_its_header(capsys, data_copy, tmp_path, side):
    ids = pd.read_csv(data_copy / "phase2_train.csv", dtype=str)["ID"]
    png_header_only(data_copy / "phase2" / "train" / ids[3], side, side)  # a .jpg name: the content decides
    code, text = run_cli(capsys, "train-fold", "-c", "configs/recipes/tiny_cpu.yaml", "--fold", "0",
                         f"data.root={data_copy}", f"data.cache_dir={tmp_path / 'cache'}",
                         f"output_dir={tmp_path / 'out'}", f"folds.file={tmp_path / 'folds.csv'}")
    if code == 2 and "folds file not found" in text:  # the folds first, then the same check from training
        run_cli(capsys, "folds", "-c", "configs/recipes/tiny_cpu.yaml", f"data.root={data_copy}",
                f"folds.file={tmp_path / 'folds.csv'}")
        code, text = run_cli(capsys, "train-fold", "-c", "configs/recipes/tiny_cpu.yaml", "--fold", "0",
                             f"data.root={data_copy}", f"data.cache_dir={tmp_path / 'cache'}",
                             f"output_dir={tmp_path / 'out'}", f"folds.file={tmp_path / 'folds.csv'}")
    one_error(code, text, "phase2_train.csv:5", f"image {side} x {side} is larger than data.max_image_pixels")


# ---------------------------------------------------------------- 6. validated first, one line per problem

@pytest.mark.parametrize("override, needle", [
    ("train.epochs=abc", "train.epochs: expected an integer, got 'abc'"),
    ("train.lr=abc", "train.lr: expected a number, got 'abc'"),
    ("train.epochs=-1", "train.epochs: must be >= 0, got -1"),
    ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
    ("data.image_size=0", "data.image_size: must be >= 8, got 0"),
    ("predict.tta=3", "predict.tta: expected one of 1, 2, 4, 8, got 3"),
    ("name=../../x", "name: a name is one plain file name"),
    ("augment.flip=abc", "augment.flip: expected a number, got 'abc'"),  # any key by its base.yaml default's kind
    ("ensemble.tuning.n_trials=abc", "ensemble.tuning.n_trials: expected a number, got 'abc'"),
    ("train.compile=maybe", "train.compile: expected true or false, got 'maybe'"),
    ("ensemble.members=outputs/a", "ensemble.members: expected a list of run folders"),
    ("ensemble.blend.weights=[a,b]", "ensemble.blend.weights: expected fit, equal or a list of numbers, got ['a'"),
])
def test_a_bad_value_is_one_line_before_any_work(capsys, sample_root, tmp_path, override, needle):
    code, text = run_cli(capsys, "train-fold", "-c", "configs/recipes/tiny_cpu.yaml", "--fold", "0",
                         f"data.root={sample_root}", f"output_dir={tmp_path / 'out'}", override)
    one_error(code, text, needle)
    assert not (tmp_path / "out").exists()  # nothing written, not even the run folder


def test_two_bad_values_are_two_lines(capsys, sample_root):
    code, text = run_cli(capsys, "folds", "-c", "configs/recipes/tiny_cpu.yaml", f"data.root={sample_root}",
                         "train.epochs=abc", "predict.tta=3")
    assert code == 2 and "2 invalid config values" in text
    assert "train.epochs: expected an integer" in text and "predict.tta: expected one of" in text


def test_a_submission_name_that_escapes_submissions_is_refused(capsys, sample_root, tmp_path):
    code, text = run_cli(capsys, "submit", "-c", "configs/recipes/tiny_cpu.yaml", f"data.root={sample_root}",
                         "--pred", tmp_path, "--name", "../../x")
    one_error(code, text, "--name: a name is one plain file name")


def test_a_truncated_cache_is_rebuilt_and_a_truncated_checkpoint_is_one_line(make_cfg, sample_root, tmp_path):
    from wbc.core.io import torch_load, torch_save
    from wbc.s1_data.cache import cache_dir, split_images
    from wbc.s1_data.layout import read_split

    cfg = make_cfg(sample_root)
    df = read_split(sample_root, "phase1")
    a = np.array(split_images(cfg, df, "phase1"))
    u8 = cache_dir(cfg) / "phase1.u8"
    u8.write_bytes(u8.read_bytes()[: u8.stat().st_size // 2])  # a copy cut short
    assert np.array_equal(np.array(split_images(cfg, df, "phase1")), a)
    torch_save(tmp_path / "last.pt", {"w": np.zeros(3)})
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:40])
    with pytest.raises(WBCError, match=r"last\.pt: unreadable checkpoint .* delete it and train again"):
        torch_load(tmp_path / "last.pt")


def test_a_full_disk_is_one_line(capsys, sample_root, tmp_path, monkeypatch):
    import wbc.core.io as io

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "folds.csv"))

    monkeypatch.setattr(io.pd.DataFrame, "to_csv", full)
    code, text = run_cli(capsys, "folds", "-c", "configs/recipes/tiny_cpu.yaml", f"data.root={sample_root}",
                         f"folds.file={tmp_path / 'folds.csv'}")
    one_error(code, text, "No space left on device", "folds.csv")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".folds")]  # no temporary file left


def test_test_split_labels_are_refused_when_not_codes_and_otherwise_unused(capsys, data_copy, make_cfg):
    from wbc.s3_train.inputs import load_fold_data

    cfg = write_folds(make_cfg(data_copy))
    classes = json.loads((data_copy.parent / "folds.json").read_text())["classes"]
    edit_csv(data_copy / "phase2_test.csv", lambda d: d.assign(labels=[classes[0]] * len(d)))
    capsys.readouterr()
    load_fold_data(cfg)
    assert "test rows carry labels; they are not used" in capsys.readouterr().out
    edit_csv(data_copy / "phase2_test.csv", lambda d: d.assign(labels=["??"] + [classes[0]] * (len(d) - 1)))
    with pytest.raises(WBCError, match=r"phase2_test.csv:2: unknown label '\?\?'"):
        load_fold_data(cfg)


# ---------------------------------------------------------------- the competition's own files

def test_a_test_file_needs_only_its_ids_and_img_dir_names_the_folder(data_copy):
    from wbc.s1_data.layout import read_split

    edit_csv(data_copy / "phase2_test.csv", lambda d: d[["ID"]])
    test = read_split(data_copy, "phase2_test")
    assert len(test) and (test["labels"] == "").all()
    one = pd.read_csv(data_copy / "phase1_label.csv", dtype=str).iloc[0]
    (data_copy / "phase2" / "train" / one["ID"]).unlink(missing_ok=True)

    def listed_with_its_folder(d):  # a phase1 image listed in the phase2 file, as the combined label file does
        row = pd.DataFrame({"ID": [one["ID"]], "labels": [one["labels"]], "img_dir": ["phase1"]})
        return pd.concat([d.assign(img_dir=""), row], ignore_index=True)

    edit_csv(data_copy / "phase2_train.csv", listed_with_its_folder)
    edit_csv(data_copy / "phase1_label.csv", lambda d: d.iloc[1:])
    train = read_split(data_copy, "phase2_train")
    assert train["path"].iloc[-1] == str(data_copy / "phase1" / one["ID"])
    edit_csv(data_copy / "phase2_train.csv", lambda d: d.assign(img_dir=["../elsewhere"] + list(d["img_dir"][1:])))
    with pytest.raises(WBCError, match=r"phase2_train.csv:2: img_dir '../elsewhere' points outside the data root"):
        read_split(data_copy, "phase2_train")


# ---------------------------------------------------------------- runs keep to one dataset

def test_runs_on_two_datasets_never_mix_under_one_name(sample_root, make_cfg, tmp_path):
    """By default a run is named after its dataset, so the same recipe on two datasets gives two runs; forced under
    one name, the second dataset is refused before anything is written, naming both."""
    import shutil

    from wbc.core.config import CONFIG_DIR, load_config
    from wbc.core.run_folder import run_dir
    from wbc.s3_train.loop import train_fold

    other = tmp_path / "lab2"
    shutil.copytree(sample_root, other)
    recipe = CONFIG_DIR / "recipes/tiny_cpu.yaml"
    assert load_config(recipe, [f"data.root={sample_root}"])["name"] == "sample_tiny_cpu"
    assert load_config(recipe, [f"data.root={other}"])["name"] == "lab2_tiny_cpu"
    a = write_folds(make_cfg(sample_root, "name=shared", "train.epochs=1", "folds.n_folds=2"))
    train_fold(a, 0)
    b = write_folds(make_cfg(other, "name=shared", "train.epochs=1", "folds.n_folds=2",
                             f"folds.file={tmp_path / 'lab2.csv'}"))
    before = sorted(p.name for p in (run_dir(a) / "fold0").iterdir())
    with pytest.raises(WBCError, match=r"shared: holds runs on sample \(folds .*\); this config's data is lab2"):
        train_fold(b, 0)
    assert sorted(p.name for p in (run_dir(a) / "fold0").iterdir()) == before


# ---------------------------------------------------------------- 7. files tampered with between steps

@pytest.mark.slow
def test_tampered_fold_files_are_one_line_each(capsys, sample_root, make_cfg):
    """One trained 2-fold run, then each file a user or a copy could break: another fold's checkpoint, another
    architecture's, a changed folds file, OOF rows of another fold, a torn metrics line, unreadable JSON."""
    import shutil

    from wbc.core.run_folder import read_metrics, run_dir
    from wbc.s3_train.loop import train_fold

    cfg = make_cfg(sample_root, "folds.n_folds=2", "train.epochs=1", "predict.tta=1")
    write_folds(cfg)
    for k in (0, 1):
        train_fold(cfg, k)
    run = run_dir(cfg)
    f0, f1 = run / "fold0", run / "fold1"
    cmd = ["predict", *cli_cfg(cfg), "folds.n_folds=2", "train.epochs=1", "predict.tta=1"]
    assert main(cmd) == 0
    capsys.readouterr()
    best0 = f0.joinpath("best.pt").read_bytes()

    oof = (f0 / "oof.csv").read_text()
    (f0 / "oof.csv").unlink()  # fold 0 to predict again
    shutil.copy(f1 / "best.pt", f0 / "best.pt")  # fold 1's model predicting fold 0's OOF: it trained on them
    one_error(*run_cli(capsys, *cmd), "fold0/best.pt: a checkpoint fold1 wrote")
    f0.joinpath("best.pt").write_bytes(best0)

    (f0 / "best.pt").write_bytes(__import__("io").BytesIO().getvalue())  # not a checkpoint at all
    one_error(*run_cli(capsys, *cmd), "fold0/best.pt: unreadable checkpoint")
    import torch
    torch.save({"conv.weight": torch.zeros(1)}, f0 / "best.pt")  # another architecture's state_dict
    one_error(*run_cli(capsys, *cmd), "fold0/best.pt: does not match this config")
    f0.joinpath("best.pt").write_bytes(best0)

    assert main(cmd) == 0
    capsys.readouterr()
    oof = (f0 / "oof.csv").read_text().splitlines()  # a row that says it belongs to another fold
    head = oof[0].split(",")
    row = oof[1].split(",")
    row[head.index("fold")] = "1"
    (f0 / "oof.csv").write_text("\n".join([oof[0], ",".join(row), *oof[2:]]) + "\n")
    one_error(*run_cli(capsys, *cmd), "fold0/oof.csv:2: fold 1, not 0")
    (f0 / "oof.csv").write_text("\n".join(oof) + "\n")

    (f0 / "prediction.json").write_text("{not json")
    one_error(*run_cli(capsys, *cmd), "fold0/prediction.json: not readable JSON")
    (f0 / "prediction.json").unlink()

    metrics = (f0 / "metrics.jsonl").read_text()
    (f0 / "metrics.jsonl").write_text(metrics + '{"epoch": 1, "trai')  # a writer killed mid-line
    assert len(read_metrics(f0)) == 1 and "a torn last record, dropped" in capsys.readouterr().out
    (f0 / "metrics.jsonl").write_text('{"epoch": 0, "trai\n' + metrics)  # damage before the last line
    with pytest.raises(WBCError, match=r"metrics.jsonl:1: not a JSON record"):
        read_metrics(f0)
    (f0 / "metrics.jsonl").write_text(metrics)

    folds = cfg["folds"]["file"]
    df = pd.read_csv(folds, dtype=str)
    df["fold"] = df["fold"].map({"0": "1", "1": "0"})  # the folds swapped after training: OOF rows were trained on
    df.to_csv(folds, index=False)
    one_error(*run_cli(capsys, *cmd), "sample_tiny_cpu: holds runs on sample (folds ")  # the run's record first
    code, text = run_cli(capsys, "train-fold", "--fold", "0", "--resume", *cli_cfg(cfg), "folds.n_folds=2",
                         "train.epochs=1", "predict.tta=1")
    one_error(code, text, "trained on another content of")


@pytest.mark.parametrize("argv, needle", [
    (["train-fold", "--fold", "a"], "wbc train-fold: argument --fold: folds are integers"),
    (["damage-match", "--images", "0"], "wbc damage-match: argument --images: must be at least 1, got 0"),
    (["predict", "--no-such-flag"], "wbc: unrecognized arguments: --no-such-flag"),
])
def test_a_command_line_mistake_is_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    one_error(e.value.code, (out.out + out.err).strip(), needle)


def test_brackets_in_an_error_are_printed_not_read_as_markup(capsys, sample_root, tmp_path, monkeypatch):
    code, text = run_cli(capsys, "morph", "-c", "configs/steps/refine.yaml", f"data.root={sample_root}",
                         f"morph.out_dir={tmp_path}", "morph.splits=[nosuch]")
    one_error(code, text, "morph.splits: unknown split(s) nosuch (one of phase1")

    def refused(*a):
        raise WBCError("ensemble.blend.weights: [a,b] is not fit, equal or a list of numbers")

    monkeypatch.setattr("wbc.core.cli.load_config", refused)
    code, text = run_cli(capsys, "folds")
    one_error(code, text, "ensemble.blend.weights: [a,b] is not fit")  # rich markup would have swallowed '[a,b]'


def test_a_fold_outside_the_folds_is_refused_before_any_folder(capsys, sample_root, tmp_path):
    code, text = run_cli(capsys, "train-fold", "--fold", "5", "-c", "configs/recipes/tiny_cpu.yaml",
                         f"data.root={sample_root}", f"output_dir={tmp_path / 'out'}", "folds.n_folds=2")
    one_error(code, text, "--fold 5: folds.n_folds is 2, so the folds are 0-1")
    code, text = run_cli(capsys, "folds", "-c", "configs/recipes/tiny_cpu.yaml", f"data.root={sample_root}",
                         f"output_dir={tmp_path / 'out'}", "data.name=../../esc")  # it names folds/ and cache/ files
    assert code == 2 and "data.name: a name is one plain file name" in text
    assert not (tmp_path / "out").exists()


def test_optional_steps_refuse_a_killed_steps_folder_and_refine_finds_its_default_config(make_cfg, sample_root,
                                                                                          tmp_path):
    from wbc.__main__ import build_parser
    from wbc.core.config import config_path
    from wbc.core.run_folder import WRITING
    from wbc.optional.label_issues import label_issues
    from wbc.optional.pseudo.select import pseudo_label
    from wbc.optional.shift.report import shift_report

    cfg = make_cfg(sample_root)
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / WRITING).write_text("")
    for step in (lambda: label_issues(cfg, killed), lambda: pseudo_label(cfg, killed),
                 lambda: shift_report(cfg, [killed])):
        with pytest.raises(WBCError, match=r"killed: its outputs are incomplete"):
            step()
    for cmd in ("morph", "refine"):  # the documented default, after the configs were regrouped
        assert config_path(build_parser().parse_args([cmd]).config).is_file()


def test_a_broken_cache_key_is_recomputed_and_a_decisions_file_without_labels_is_one_line(sample_root, tmp_path):
    from wbc.core.io import Probs, save_probs
    from wbc.optional.pseudo.select import _decisions
    from wbc.s1_data.layout import read_split
    from wbc.s6_refine.morphology import SegParams
    from wbc.s6_refine.run import cached_features

    df = read_split(sample_root, "phase1").head(3)[["ID", "labels", "split", "path"]]
    paths = {"features": tmp_path / "f.csv", "meta": tmp_path / "f.json"}
    first = cached_features(df, SegParams(), paths, 1, False)
    paths["meta"].write_text("{not json")  # a torn key file: the cache is rebuilt, not a traceback
    again = cached_features(df, SegParams(), paths, 1, False)
    pd.testing.assert_frame_equal(first.reset_index(drop=True), again.reset_index(drop=True))

    ids = ["a.png", "b.png"]
    save_probs(tmp_path / "test.csv", Probs(np.array(ids), np.full((2, 2), 0.5), ["LY", "SNE"]))
    (tmp_path / "test_pred.csv").write_text("ID,label\na.png,LY\nb.png,SNE\n")
    with pytest.raises(WBCError, match=r"test_pred.csv:1: missing column\(s\) labels"):
        _decisions(tmp_path, "test")


def test_a_typo_in_a_steps_own_section_is_one_line(make_cfg, sample_root):
    from wbc.optional.embed.run import with_defaults
    from wbc.optional.shift.features import shift_dir

    with pytest.raises(WBCError, match=r"embed.epoch: unknown key"):
        with_defaults(make_cfg(sample_root, "embed={epoch: 1}"))
    with pytest.raises(WBCError, match=r"embed.epochs: expected a number, got 'abc'"):
        with_defaults(make_cfg(sample_root, "embed={epochs: abc}"))
    with pytest.raises(WBCError, match=r"shift.out_dri: unknown key \(known: out_dir, match_dir\)"):
        shift_dir(make_cfg(sample_root, "shift={out_dri: x}"))


def test_a_class_of_one_image_is_named_with_its_file_and_row(capsys, data_copy, make_cfg):
    """Before the classes are declared, a one-row typo becomes a class: the warning says where it is."""
    edit_csv(data_copy / "phase1_label.csv", lambda d: d.assign(labels=["LYY"] + list(d["labels"][1:])))
    write_folds(make_cfg(data_copy))
    assert "LYY (1: " in (out := capsys.readouterr().out) and "phase1_label.csv:2, a typo?)" in out


def test_an_unknown_training_split_is_named(capsys, data_copy, tmp_path):
    code, text = run_cli(capsys, "folds", "-c", "configs/recipes/tiny_cpu.yaml", f"data.root={data_copy}",
                         f"folds.file={tmp_path / 'f.csv'}", "data.train_splits=[nosuch]")  # no classes declared yet
    one_error(code, text, "data.train_splits: unknown split 'nosuch' (known: phase1, ")
