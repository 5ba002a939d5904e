"""Bundles: a run without checkpoints as one .tar.gz, and back; bundles of one run from several calls or sessions
unbundle to the same folders in any order."""
import io
import json
import os
import tarfile

import pytest

from wbc.core.errors import WBCError
from wbc.ops.bundle import bundle_run, unbundle


def _fold(run, fold, finished, stamp):
    """A fold folder as training leaves it: finished = predicted after its last training start."""
    out = run / f"fold{fold}"
    out.mkdir(parents=True)
    for name in ("env.json", "metrics.jsonl", "state.pt"):
        (out / name).write_text(f"{name} {stamp}")
        os.utime(out / name, (stamp, stamp))
    if finished:
        (out / "train_result.json").write_text(json.dumps({"fold": fold, "epochs": 3, "stamp": stamp}))
        (out / "oof.csv").write_text(f"ID,fold,labels,prob_A,prob_B\nimg{stamp}.jpg,{fold},A,0.9,0.1\n")
        for name in ("train_result.json", "oof.csv"):
            os.utime(out / name, (stamp + 1, stamp + 1))


def _stamp(fold_dir):
    return json.loads((fold_dir / "train_result.json").read_text())["stamp"]


def test_bundles_unbundle_fold_by_fold_and_finished_folds_win_in_any_order(tmp_path):
    # call 1 finished fold 0 and was stopped in fold 1; call 2 (a resume) finished fold 1; a stray later bundle
    # holds fold 0 restarted and killed before its predictions.
    bundles = []
    for i, folds in enumerate([[(0, True), (1, False)], [(1, True)], [(0, False)]]):
        run = tmp_path / f"machine{i}" / "convnext"
        for fold, done in folds:
            _fold(run, fold, done, stamp=1_000_000 + 100 * i)
        (run / "config.yaml").write_text(f"call {i}")
        bundles.append(bundle_run(run, tmp_path / f"out{i}"))
    with tarfile.open(bundles[0]) as t:
        assert not [m for m in t.getmembers() if m.name.endswith(".pt")]

    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        into = tmp_path / f"outputs_{''.join(map(str, order))}"
        for i in order:
            unbundle(bundles[i], into)
        run = into / "convnext"
        assert _stamp(run / "fold0") == 1000000  # call 1's finished fold 0
        assert _stamp(run / "fold1") == 1000100  # call 2's
        assert (run / "config.yaml").read_text() == f"call {order[0]}"  # the first one unbundled
        assert sorted(p.name for p in into.iterdir()) == ["convnext"]  # no temporary folder left

    res = unbundle(bundles[2], tmp_path / "outputs_012")
    assert res == {"run": "convnext", "taken": [], "kept": ["fold0"]}


def test_a_bundle_that_escapes_its_folder_or_holds_two_runs_is_refused(tmp_path):
    def tar_with(*names):
        path = tmp_path / f"b{len(list(tmp_path.iterdir()))}.tar.gz"
        with tarfile.open(path, "w:gz") as t:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 1
                t.addfile(info, io.BytesIO(b"x"))
        return path

    with pytest.raises(WBCError, match="refused"):
        unbundle(tar_with("run/fold0/oof.csv", "run/../../evil.txt"), tmp_path / "outputs")
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(WBCError, match="one run folder"):
        unbundle(tar_with("a/x.csv", "b/x.csv"), tmp_path / "outputs")
    (tmp_path / "junk.tar.gz").write_text("not a tar")
    with pytest.raises(WBCError, match="not a readable bundle"):
        unbundle(tmp_path / "junk.tar.gz", tmp_path / "outputs")
    assert list((tmp_path / "outputs").iterdir()) == []  # nothing half-extracted left behind
    for top in ("./fold0/oof.csv", "/fold0/oof.csv"):  # `tar -C run .`, absolute names: no run folder to fill
        with pytest.raises(WBCError, match="is no run name"):
            unbundle(tar_with(top), tmp_path / "outputs")
    assert list((tmp_path / "outputs").iterdir()) == []
    dead = tmp_path / "outputs" / ".run.tmp999999999-abc"  # a killed unbundle's folder (no such process)
    (dead / "run").mkdir(parents=True)
    unbundle(tar_with("run/fold0/oof.csv"), tmp_path / "outputs")
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["run"]


def test_an_unfinished_bundle_fold_never_replaces_a_local_one(tmp_path):
    """A local fold stopped mid-training keeps its checkpoints (the bundle has none) for a resume."""
    remote = tmp_path / "remote" / "convnext"
    _fold(remote, 1, finished=False, stamp=2_000_000)
    (remote / "fold1" / "oof.csv").write_text("stale predictions of an earlier finish")
    (remote / "config.yaml").write_text("remote")
    local = tmp_path / "outputs" / "convnext"
    _fold(local, 1, finished=False, stamp=1_000_000)
    res = unbundle(bundle_run(remote, tmp_path / "b"), tmp_path / "outputs")
    assert res["kept"] == ["fold1"] and (local / "fold1" / "state.pt").read_text() == "state.pt 1000000"


def test_links_in_a_bundle_and_folders_that_are_not_runs_are_refused(tmp_path):
    path = tmp_path / "link.tar.gz"
    with tarfile.open(path, "w:gz") as t:  # fold0 -> another run's fold0, harmless inside the temporary folder
        info = tarfile.TarInfo("run/fold0")
        info.type, info.linkname = tarfile.SYMTYPE, "../other/fold0"
        t.addfile(info)
    with pytest.raises(WBCError, match=r"refused \(run/fold0 is a link or a special file\)"):
        unbundle(path, tmp_path / "outputs")
    assert list((tmp_path / "outputs").iterdir()) == []
    for not_a_run in (tmp_path / "outputs", tmp_path / "nope"):
        with pytest.raises(WBCError, match="not a run folder"):
            bundle_run(not_a_run, tmp_path / "b")


def test_an_incoming_fold_is_checked_before_it_replaces_anything_and_local_checkpoints_are_kept(tmp_path):
    """A bundle whose fold claims to be finished but holds an empty oof.csv and `{}` as its training record is
    refused, and the local fold stays whole; a real finished fold takes the place, the local one kept beside."""
    local = tmp_path / "outputs" / "convnext"
    _fold(local, 0, finished=False, stamp=1_000_000)
    (local / "fold0" / "best.pt").write_text("local weights")
    bad = tmp_path / "bad" / "convnext"
    _fold(bad, 0, finished=True, stamp=2_000_000)
    (bad / "fold0" / "oof.csv").write_text("ID,fold,labels,prob_A,prob_B\n")
    (bad / "fold0" / "train_result.json").write_text("{}")
    for name in ("oof.csv", "train_result.json"):  # it claims to be finished: predicted after its training
        os.utime(bad / "fold0" / name, (2_000_001, 2_000_001))
    (bad / "config.yaml").write_text("bad")
    with pytest.raises(WBCError, match=r"convnext/fold0: refused, oof.csv holds 0 rows"):
        unbundle(bundle_run(bad, tmp_path / "b1"), tmp_path / "outputs")
    assert (local / "fold0" / "best.pt").read_text() == "local weights"
    good = tmp_path / "good" / "convnext"
    _fold(good, 0, finished=True, stamp=3_000_000)
    (good / "config.yaml").write_text("good")
    assert unbundle(bundle_run(good, tmp_path / "b2"), tmp_path / "outputs")["taken"] == ["fold0"]
    assert _stamp(local / "fold0") == 3000000
    beside = [p for p in local.iterdir() if p.name.startswith("fold0.local-")]
    assert len(beside) == 1 and (beside[0] / "best.pt").read_text() == "local weights"


def test_a_dead_writers_temporary_file_is_cleaned_and_never_bundled(tmp_path):
    from wbc.core.io import write_text

    run = tmp_path / "run"
    _fold(run, 0, finished=True, stamp=1_000_000)
    (run / "config.yaml").write_text("x")
    dead = run / "fold0" / ".eval.csv.tmp999999999-abc.csv"  # pid 999999999: no such process
    live = run / "fold0" / f".test.csv.tmp{os.getpid()}-abc.csv"
    dead.write_text("")
    live.write_text("")
    with tarfile.open(bundle_run(run, tmp_path / "b")) as t:
        assert not [m.name for m in t.getmembers() if ".tmp" in m.name]
    write_text(run / "fold0" / "eval.csv", "ID\n")  # any write into the folder sweeps dead writers' files
    assert not dead.exists() and live.exists()
