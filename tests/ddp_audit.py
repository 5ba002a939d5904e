"""`python tests/ddp_audit.py <log dir> <watched dir> <wbc arguments...>`: runs `python -m wbc <wbc arguments>` and
records every file this process writes, renames, removes or creates under the watched folder (Python's audit hooks:
`open` for writing, `os.rename` / `os.replace`, `os.remove`, `os.mkdir`, ...) into `<log dir>/rank<RANK>.json`.
torchrun starts it once per rank for tests/test_ddp.py, which checks that only rank 0 wrote anything."""
import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "os.symlink", "os.link", "os.chmod",
           "os.utime", "shutil.rmtree"}


def recorder(watch: str, ignore: str, written: list):
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = bool(flags & WRITE_FLAGS) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            paths = [path] if writes else []
        elif event in CHANGES:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for p in paths:
            p = os.fsdecode(p) if isinstance(p, (str, bytes, os.PathLike)) else ""
            p = os.path.abspath(p) if p else ""
            if p.startswith(watch) and not p.startswith(ignore):
                written.append(p)
    return hook


def main() -> int:
    log_dir, watch, argv = Path(sys.argv[1]), os.path.abspath(sys.argv[2]), sys.argv[3:]
    written: list[str] = []
    sys.addaudithook(recorder(watch, str(log_dir.resolve()), written))
    from wbc.__main__ import main as wbc

    try:
        return wbc(argv)
    finally:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(sorted(set(written))))


if __name__ == "__main__":
    sys.exit(main())
