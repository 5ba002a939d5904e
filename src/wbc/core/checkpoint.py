"""Resume state of a training loop, shared by fold training, the embedding head and the restorer.

One file holds the state_dicts of the loop's named objects (model, EMA, optimizers, schedulers, scaler), the RNG
states and a few plain extras (epoch, best score); it is written atomically and read with `weights_only=True`, so
only tensors, numbers and strings go in. The per-epoch metrics live beside it (`run_folder.write_metrics`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from .errors import WBCError, first_line
from .io import torch_load, torch_save
from .runtime import rng_state, set_rng_state


def save_state(path: Path, objects: dict, **extra) -> None:
    """`path` <- {name: obj.state_dict()} for each object that is not None (None is kept as None), the RNG states
    and `extra`."""
    state = {k: (None if o is None else o.state_dict()) for k, o in objects.items()}
    torch_save(path, {**state, "rng": rng_state(), **extra})


def read_state(path: Path) -> dict:
    return torch_load(path)


@contextlib.contextmanager
def _matching(path: Path, remedy: str):
    """A file that does not fit what loads it (another architecture, not a state_dict at all) as one error line."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise WBCError(f"{path}: does not match this config ({first_line(e)}); {remedy}") from None


def load_state(path: Path, objects: dict, rng: bool = True, state: dict | None = None) -> dict:
    """Restore each object of `objects` that the file holds (the RNG states too, with `rng`) and return the whole
    state, extras included; `state` is the file's content when already read. A state of another configuration is
    one error line naming the file."""
    state = read_state(path) if state is None else state
    with _matching(path, "delete it to start fresh"):
        for k, o in objects.items():
            if o is not None and state.get(k) is not None:
                o.load_state_dict(state[k])
    if rng and "rng" in state:
        set_rng_state(state["rng"])
    return state


def load_weights(path: Path, model) -> None:
    """A weights file (best.pt, last.pt: a plain state_dict) into `model`; one of another architecture, or no
    state_dict at all, is one error line naming it."""
    state = torch_load(path)
    with _matching(path, "it is not this run's model: train the fold again"):
        model.load_state_dict(state)
