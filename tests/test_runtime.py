"""Random-state snapshots for resumes (wbc.core.runtime)."""
import torch


def test_cuda_random_state_is_this_devices_only(monkeypatch):
    """A fold saved with 4 GPUs visible resumes in a process that sees one (`GPUS=`): only the current device's
    generator is saved and restored, and a state saved per GPU by older versions restores its first entry."""
    from wbc.core import runtime

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(int(state[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(int(s[0]) for s in states))
    state = runtime.rng_state()
    assert [int(s[0]) for s in state["cuda"]] == [7]
    runtime.set_rng_state(state)
    state["cuda"] = [torch.tensor([i], dtype=torch.uint8) for i in (3, 4, 5, 6)]  # an older state.pt, 4 GPUs
    runtime.set_rng_state(state)
    assert restored == [7, 3]
