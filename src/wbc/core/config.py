"""YAML experiment configs: `configs/base.yaml` defaults <- experiment file <- `key=value` overrides.

A config may name a parent with `base: other.yaml` (relative to its folder); `configs/base.yaml` is the
root of every chain. The resolved config is dumped beside the outputs so a run can be re-created.
"""
from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path

import yaml

from .errors import WBCError, first_line
from .validate import check_values, get_dotted


def _project_root() -> Path:
    """Where relative paths (data/, folds/, outputs/, weights/) live: WBC_HOME, else the checkout this package runs
    from (an editable install), else the working folder (a wheel installed outside any checkout)."""
    if os.environ.get("WBC_HOME"):
        return Path(os.environ["WBC_HOME"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[3]
    return checkout if (checkout / "configs" / "base.yaml").exists() else Path.cwd().resolve()


def _config_dir(root: Path) -> Path:
    """The project's configs/, else the copy a wheel installs under <prefix>/share/wbc/configs."""
    if (root / "configs" / "base.yaml").exists():
        return root / "configs"
    import sysconfig

    return Path(sysconfig.get_path("data")) / "share" / "wbc" / "configs"


ROOT = _project_root()
CONFIG_DIR = _config_dir(ROOT)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: Path) -> dict:
    if not path.exists():
        raise WBCError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise WBCError(f"{path}: invalid YAML ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise WBCError(f"{path}: a config must be a mapping")
    return data


def _chain(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise WBCError(f"{path}: config inherits from itself")
    data = read_yaml(path)
    parent = data.pop("base", None)
    if parent is None:
        root = CONFIG_DIR / "base.yaml"
        base = {} if path == root.resolve() else _chain(root, seen + (path,))
    else:
        base = _chain((path.parent / parent), seen + (path,))
    return deep_merge(base, data)


STEP_SECTIONS = ("embed", "restorer", "shift", "ssl")  # optional steps: each checks its own keys, with its own defaults
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-3: YAML 1.1 wants 1.0e-3


def parse_override(text: str, current=None) -> tuple[list[str], object]:
    """`key=value`, the value read as YAML, except where the key holds text now (`name`, `data.root`,
    `output_dir`, ...): there it stays the text given (`name=2024-01-01`, `data.root=/data #2`), or null, unless
    it is a YAML list or mapping (a key that takes a word or a list)."""
    if "=" not in text:
        raise WBCError(f"override '{text}' is not key=value")
    key, val = text.split("=", 1)
    listed = val.lstrip().startswith(("[", "{")) and key.strip() != "name"  # `blend.weights=[0.3,0.7]` for "fit"
    if isinstance(current, str) and not listed:
        if val == "":
            raise WBCError(f"override '{text}': empty value")
        return key.strip().split("."), None if val == "null" else val
    try:
        value = yaml.safe_load(val) if val != "" else None
    except yaml.YAMLError as e:
        raise WBCError(f"override '{text}': invalid YAML value ({first_line(e)})") from None
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        value = float(value)
    return key.strip().split("."), value


def set_dotted(cfg: dict, keys: list[str], value) -> None:
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise WBCError(f"override {'.'.join(keys)}: {k} is not a section")
    node[keys[-1]] = value


def leaves(cfg: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every leaf (an empty section counts as a leaf)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and v:
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def unknown_keys(cfg: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Dotted keys of `cfg` that sit in a section `configs/base.yaml` defines but are not among its keys:
    typos such as `train.epoch`, which would otherwise be silently ignored. Free-form sections (empty in
    the defaults, like `model.kwargs`) and the steps' own top-level sections (`STEP_SECTIONS`: each step checks
    its keys) are not checked here; any other top-level key the defaults lack (`outptu_dir=x`, a `trian:`
    section) is unknown."""
    out = []
    for k, v in cfg.items():
        if k not in defaults:
            if prefix or not isinstance(v, dict) or k not in STEP_SECTIONS:
                out.append(prefix + str(k))
            continue
        d = defaults[k]
        if isinstance(d, dict) and d and isinstance(v, dict):
            out += unknown_keys(v, d, f"{prefix}{k}.")
    return out


def _refuse_unknown(cfg: dict, defaults: dict, where: str) -> None:
    bad = sorted(unknown_keys(cfg, defaults))
    if bad:
        raise WBCError(f"{where}: unknown config key(s) {', '.join(bad)} (configs/base.yaml lists every key)")


def config_path(path=None) -> Path:
    """A config file as given; one not found there but under the installed configs (`configs/recipes/x.yaml`
    or `recipes/x.yaml`) is taken from them, so a wheel install runs the README's commands from any folder."""
    if not path:
        return CONFIG_DIR / "base.yaml"
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    inside = Path(*p.parts[1:]) if p.parts[:1] == ("configs",) else p
    return CONFIG_DIR / inside if (CONFIG_DIR / inside).exists() else p


def load_config(path=None, overrides: list[str] | tuple = ()) -> dict:
    """Resolve a config. `path=None` gives the defaults. The run name defaults to `run_name(<file stem>)`."""
    path = config_path(path)
    cfg = _chain(path)
    defaults = read_yaml(CONFIG_DIR / "base.yaml")
    _refuse_unknown(cfg, defaults, str(path))
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        keys, val = parse_override(o, "" if key == "name" else get_dotted(cfg, key))  # a name is text
        default = get_dotted(defaults, key)
        if isinstance(default, dict) and default and not isinstance(val, dict):
            raise WBCError(f"override '{o}': {key} is a section; set its keys ({key}.<key>=...)")
        set_dotted(cfg, keys, val)
        _refuse_unknown(cfg, defaults, f"override '{o}'")
    # The data root: explicit override > WBC_DATA > config.
    if os.environ.get("WBC_DATA") and not any(o.startswith("data.root=") for o in overrides):
        cfg.setdefault("data", {})["root"] = os.environ["WBC_DATA"]
    if not cfg.get("name"):
        cfg["name"] = run_name(cfg, path.stem)
    check_values(cfg, str(path), defaults)
    return cfg


def dataset_name(cfg: dict) -> str:
    """`data.name`, else the data root folder's name: folds, caches and run names are keyed by it."""
    d = cfg.get("data") or {}
    return str(d.get("name") or resolve_path(d.get("root") or "data").name)


def run_name(cfg: dict, stem: str) -> str:
    """A run's default name: `<dataset>_<config stem>`, so that one recipe trained on two datasets gives two runs
    (`outputs/pbcbench_lite0_cpu`, `outputs/wbcbench_lite0_cpu`); a stem that already starts with the dataset's
    name is kept as it is."""
    ds = dataset_name(cfg)
    return stem if stem == ds or stem.startswith(f"{ds}_") else f"{ds}_{stem}"


@functools.lru_cache(maxsize=1)
def _base_defaults() -> dict:
    return read_yaml(CONFIG_DIR / "base.yaml")


def base_defaults() -> dict:
    """configs/base.yaml: every key with its default."""
    return copy.deepcopy(_base_defaults())


def section(name: str, given: dict | None = None) -> dict:
    """Config section `name` (dotted, e.g. `train.loss`): `given` (all or part of it) over its base.yaml defaults,
    the one place defaults live. Library functions take their section through this, so a partial dict works."""
    return deep_merge(get_dotted(_base_defaults(), name, {}), given or {})


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def resolve_path(p) -> Path:
    """Relative paths in configs are relative to the repository root, not the caller's cwd."""
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else ROOT / p


def display_path(p) -> str:
    """A path for reports and sidecars: relative to the repository when inside it (no machine paths)."""
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
