"""The Makefile's own logic: every target documented in `make help`, `bundle` packs predictions without checkpoints."""
import re
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make(*args):
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True)


def test_help_lists_every_phony_target():
    text = (ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*?)(?<!\\)\n", text, re.S | re.M).group(1).replace("\\", " ").split())
    listed = {line.split()[0] for line in re.sub(r"\x1b\[[0-9;]*m", "", make("help").stdout).splitlines() if line.strip()}
    assert phony == listed


def test_bundle_packs_a_run_without_checkpoints(tmp_path):
    run = tmp_path / "outputs" / "myrun"
    (run / "fold0").mkdir(parents=True)
    for name in ("fold0/best.pt", "fold0/state.pt", "fold0/oof.csv", "fold0/metrics.jsonl", "oof.csv", "report.json"):
        (run / name).write_text("x")
    r = make("bundle", f"RUN={run}", f"DEST={tmp_path / 'b'}")
    assert r.returncode == 0, r.stderr
    with tarfile.open(tmp_path / "b" / "myrun.tar.gz") as t:
        names = {m.name for m in t.getmembers() if m.isfile()}
    assert names == {"myrun/fold0/oof.csv", "myrun/fold0/metrics.jsonl", "myrun/oof.csv", "myrun/report.json"}
    r = make("bundle", f"RUN={tmp_path / 'nope'}", f"DEST={tmp_path / 'b'}")
    assert r.returncode != 0 and "not a folder" in r.stderr
