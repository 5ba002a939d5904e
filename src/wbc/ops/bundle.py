"""`bundle` / `unbundle`: a run's predictions, metrics and config, without checkpoints, as one .tar.gz.

Folds trained on other machines (a lent GPU, a notebook) come back this way; unbundled into `outputs/`, `make
predict` merges them and `make ensemble` blends them. Bundles of one run from several calls or sessions unbundle in
any order: a fold already there is never replaced by an unfinished one, and of two finished ones the later stays.
"""
from __future__ import annotations

import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from ..core import validate
from ..core.config import resolve_path
from ..core.errors import WBCError
from ..core.io import atomic_path, clean_stale_temps, is_temp, temp_name
from ..core.run_folder import finished, fold_index

LEFT_OUT = ".pt"  # checkpoints: hundreds of MB, and the predictions already hold what blending needs


def bundle_run(run: Path, dest: Path) -> Path:
    """`dest/<run name>.tar.gz` holding `run/` (paths start with the run's name), checkpoints left out."""
    run = Path(run).resolve()
    if not run.is_dir() or not (run / "config.yaml").is_file():
        raise WBCError(f"bundle: {run}: not a run folder (give outputs/<name>, which holds its config.yaml)")
    path = Path(dest) / f"{run.name}.tar.gz"
    def keep(m: tarfile.TarInfo):  # no checkpoints, and no temporary file a killed writer left
        return None if m.name.endswith(LEFT_OUT) or is_temp(Path(m.name).name) else m

    with atomic_path(path, suffix=".gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(run, arcname=run.name, filter=keep)
    return path


def _fold_rank(fold: Path) -> tuple:
    """Which of two copies of a fold folder to keep: finished before unfinished, then the later predictions."""
    return (finished(fold), (fold / "oof.csv").stat().st_mtime_ns if (fold / "oof.csv").exists() else 0)


def _check_incoming(bundle: Path, fold: Path) -> None:
    """An incoming fold that claims to be finished must be one: its predictions readable, with rows and the fold's
    number, and a training record that says how it ended. Checked before it may replace anything."""
    import json

    from ..core.io import load_probs

    where = f"{bundle}: {fold.parent.name}/{fold.name}"
    try:
        oof = load_probs(fold / "oof.csv", ("fold", "labels"))
        result = json.loads((fold / "train_result.json").read_text())
    except (WBCError, OSError, ValueError) as e:
        raise WBCError(f"{where}: refused, its predictions or training record are unreadable ({e})") from None
    k = fold_index(fold)
    if not len(oof.ids) or set(oof.folds.tolist()) != {k}:
        raise WBCError(f"{where}: refused, oof.csv holds {len(oof.ids)} rows of folds "
                       f"{sorted(set(oof.folds.tolist()))}, not fold {k}'s")
    if not isinstance(result, dict) or result.get("fold") != k or not result.get("epochs"):
        raise WBCError(f"{where}: refused, train_result.json does not record fold {k}'s training")


def _plain(path: Path, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's `data` filter (no absolute paths, nothing outside `dest`), and files and folders only: a link
    checked against the temporary folder could point elsewhere once moved into `outputs/`."""
    member = tarfile.data_filter(member, dest)
    if not (member.isfile() or member.isdir()):
        raise WBCError(f"{path}: refused ({member.name} is a link or a special file)")
    return member


def unbundle(path: Path, into: Path) -> dict:
    """Extract bundle `path` into `into/<run>/`, fold by fold; returns the run's name and the folds taken / kept."""
    path, into = Path(path), Path(into)
    try:
        tar = tarfile.open(path, "r:gz")
    except (OSError, tarfile.TarError) as e:
        raise WBCError(f"{path}: not a readable bundle ({e})") from None
    with tar:
        tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        if len(tops) != 1:
            raise WBCError(f"{path}: a bundle holds one run folder, found {sorted(tops)}")
        name = tops.pop()
        if validate.name_problem(name):  # `tar -C run .` or absolute members: no run folder to put them in
            raise WBCError(f"{path}: its top folder {name!r} is no run name (make one with `make bundle`)")
        into.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(into)  # a killed unbundle's folder
        tmp = Path(tempfile.mkdtemp(dir=into, prefix=temp_name(into / name)))
        try:
            try:
                tar.extractall(tmp, filter=lambda m, dest: _plain(path, m, dest))
            except tarfile.TarError as e:
                raise WBCError(f"{path}: refused ({e})") from None
            src, dst = tmp / name, into / name
            dst.mkdir(exist_ok=True)
            taken, kept = [], []
            for item in sorted(src.iterdir()):
                target = dst / item.name
                if item.is_dir() and fold_index(item) is not None:
                    # An unfinished copy only fills a gap: a local fold may hold the checkpoints to resume from.
                    if target.exists() and (not _fold_rank(item)[0] or _fold_rank(target) >= _fold_rank(item)):
                        kept.append(item.name)
                        continue
                    if _fold_rank(item)[0]:
                        _check_incoming(path, item)
                    if target.exists():  # never deleted: the local fold (its checkpoints too) is kept beside
                        target.rename(target.with_name(f"{target.name}.local-{time.strftime('%Y%m%d-%H%M%S')}"))
                    taken.append(item.name)
                elif target.exists():  # config.yaml and merged files: `make predict` rewrites the merged ones
                    continue
                shutil.move(str(item), str(target))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"run": name, "taken": taken, "kept": kept}


def register(sub) -> None:
    p = sub.add_parser("bundle", help="pack a run folder without checkpoints into DEST/<name>.tar.gz")
    p.add_argument("--run", type=Path, required=True, help="the run folder, outputs/<name>")
    p.add_argument("--dest", type=Path, default=Path("outputs/bundles"))

    def run(args):
        print(bundle_run(args.run, resolve_path(args.dest)))

    p.set_defaults(func=run)

    u = sub.add_parser("unbundle", help="extract bundles into outputs/, fold by fold (finished folds win)")
    u.add_argument("bundles", nargs="+", type=Path, help="<name>.tar.gz files from `bundle` / `train-bundle`")
    u.add_argument("--into", type=Path, default=Path("outputs"))

    def run_unbundle(args):
        from ..core.console import print_table

        rows = []
        for b in args.bundles:
            r = unbundle(b, resolve_path(args.into))
            rows.append([r["run"], " ".join(r["taken"]) or "-", " ".join(r["kept"]) or "-"])
        print_table(f"unbundled into {resolve_path(args.into)}",
                    ["run (one row per bundle)", "folds taken", "folds kept (finished there already)"], rows)

    u.set_defaults(func=run_unbundle)
