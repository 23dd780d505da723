"""The probe forward every route's check runs: two tokens through the patched model, with
hooks that see which attention layers ran (a patch that silently does nothing is the most
common complaint against SelfExtend's patches)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def probe_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device, or, when accelerate dispatched the model
    (its weights may then sit on the meta device, offloaded), its hook's execution device."""
    embeddings = model.get_input_embeddings()
    for module in (embeddings, model):
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return embeddings.weight.device


def probe(model: nn.Module, attentions: list[nn.Module], hooks: list[Callable[[], object]] = (),
          ids: tuple[int, int] = (1, 2)) -> None:
    """Run `model` on two tokens; raise RuntimeError if it fails or an attention layer did not
    run. `hooks` are callables that register a forward hook and return its handle."""
    calls = {a: 0 for a in attentions}
    handles = [a.register_forward_hook(lambda mod, args, out: calls.__setitem__(mod, calls[mod] + 1)) for a in attentions]
    handles += [register() for register in hooks]
    device = probe_device(model)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    except Exception as e:
        raise RuntimeError(f"patch check: a two-token probe forward of the patched model failed ({e!r}); "
                           "the model is restored") from e
    finally:
        for h in handles:
            h.remove()
    missing = [getattr(a, "layer_idx", i) for i, a in enumerate(attentions) if calls[a] == 0]
    if missing:
        raise RuntimeError(f"patch check: attention layers {missing} did not run in a probe forward")
