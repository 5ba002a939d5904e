"""The package's layout as rules: the main path's stages import only down the stages, never an optional step or the
operations plumbing; optional steps are reached through `wbc.core.hooks`; no module imports itself round a loop."""
import ast
import importlib
from pathlib import Path

import pytest

from wbc.core import hooks

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "wbc"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every wbc module `path` imports, at its top or inside a function, resolved to absolute names."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
            out |= {n if is_module(n) else base for n in names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.split(".")[0] == "wbc"}


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {m: imports(p) for m, p in MODULES.items()}


def layer(module: str) -> tuple[str, int]:
    """(kind, stage number): core, models, stage k of the main path, optional, ops, or the entry point."""
    part = module.split(".")[1] if "." in module else ""
    if part.startswith("s") and part[1:2].isdigit():
        return "stage", int(part[1])
    return part or "package", 0


def allowed(src: str, dst: str) -> bool:
    (kind, k), (dkind, dk) = layer(src), layer(dst)
    if dkind == "package" and dst == "wbc":
        return True
    rules = {
        "core": {"core"},
        "models": {"core", "models"},
        "stage": {"core", "models", "stage"},
        "optional": {"core", "models", "stage", "optional"},
        "ops": {"core", "models", "stage", "ops"},
        "__main__": {"core", "models", "stage", "optional", "ops"},
    }
    if dkind not in rules.get(kind, set()):
        return False
    return dkind != "stage" or kind != "stage" or dk <= k  # data flows down the stages only


def test_the_main_path_is_a_sequence_of_stage_folders():
    stages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and layer(f"wbc.{p.name}")[0] == "stage")
    assert stages == ["s1_data", "s2_folds", "s3_train", "s4_predict", "s5_ensemble", "s6_refine", "s7_submit"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    bad = sorted(d for d in GRAPH[module] if not allowed(module, d))
    assert not bad, f"{module} may not import {bad}"


def test_no_import_cycles():
    """Depth-first search for a back edge over every import, lazy ones included (a lazy import still ties the
    modules together)."""
    graph = {m: {d for d in deps if d in MODULES and d != m} for m, deps in GRAPH.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


@pytest.mark.parametrize("point", sorted(hooks.HOOKS))
def test_every_hook_resolves_to_a_module_that_provides_its_point(point):
    provides = {"preprocess": ("cache_tag", "build"), "train_rows": ("load",), "train_batch": ("build",),
                "predict_adapt": ("adapt",), "augment": ("ops",), "model_build": ("convert",)}[point]
    for switch, _, module in hooks.HOOKS[point]:
        mod = importlib.import_module(module)
        assert layer(module)[0] == "optional", module
        assert all(callable(getattr(mod, f, None)) for f in provides), (switch, module)


def test_a_recipe_switches_no_optional_step_on():
    from wbc.core.config import CONFIG_DIR, load_config

    for recipe in sorted((CONFIG_DIR / "recipes").glob("*.yaml")):
        cfg = load_config(recipe)
        assert not any(hooks.switched_on(p, cfg) for p in hooks.HOOKS), recipe.name
