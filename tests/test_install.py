"""A wheel installed outside the checkout: the configs travel with it and are found from any working folder."""
import importlib
from pathlib import Path

import pytest
import tomllib

from wbc.core import config as config_mod

REPO = Path(__file__).resolve().parents[1]


def test_every_config_folder_travels_with_the_wheel():
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = {dest.removeprefix("share/wbc/") for dest, globs in data_files.items()
               if globs == [f"{dest.removeprefix('share/wbc/')}/*.yaml"]}
    folders = {str(p.parent.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")}
    assert folders == shipped


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """config.py as a wheel sees it: no configs/ beside the package, configs under <prefix>/share/wbc/configs."""
    prefix, work = tmp_path / "venv", tmp_path / "work"
    share = prefix / "share" / "wbc" / "configs" / "recipes"
    share.mkdir(parents=True)
    (share.parent / "base.yaml").write_text((REPO / "configs" / "base.yaml").read_text())
    (share / "tiny_cpu.yaml").write_text((REPO / "configs" / "recipes" / "tiny_cpu.yaml").read_text())
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("WBC_HOME", raising=False)
    monkeypatch.setattr(Path, "exists", _hide_checkout(Path.exists))
    import sysconfig

    real = sysconfig.get_path
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(prefix) if name == "data" else real(name))
    mod = importlib.reload(config_mod)
    yield mod, work, share.parent
    monkeypatch.undo()
    importlib.reload(config_mod)


def _hide_checkout(exists):
    checkout_configs = REPO / "configs"
    return lambda self: False if Path(self).is_relative_to(checkout_configs) else exists(self)


def test_wheel_finds_its_configs_from_any_folder(installed):
    mod, work, share = installed
    assert mod.ROOT == work  # data/, folds/, outputs/ go to the working folder
    assert mod.CONFIG_DIR == share
    for given in ("configs/recipes/tiny_cpu.yaml", "recipes/tiny_cpu.yaml"):
        assert mod.config_path(given) == share / "recipes" / "tiny_cpu.yaml"
    cfg = mod.load_config("configs/recipes/tiny_cpu.yaml", ["data.root=data/sample"])
    assert cfg["name"] == "sample_tiny_cpu" and cfg["model"]["arch"]


def test_a_local_config_wins_over_the_installed_one(installed):
    mod, work, _ = installed
    mine = work / "configs" / "recipes" / "tiny_cpu.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("base: ../../nowhere.yaml\n")
    assert mod.config_path("configs/recipes/tiny_cpu.yaml") == Path("configs/recipes/tiny_cpu.yaml")


def test_wbc_home_sets_the_project_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WBC_HOME", str(tmp_path))
    try:
        mod = importlib.reload(config_mod)
        assert mod.ROOT == tmp_path.resolve()
        assert mod.resolve_path("outputs/x") == tmp_path.resolve() / "outputs" / "x"
    finally:
        monkeypatch.delenv("WBC_HOME")
        importlib.reload(config_mod)
