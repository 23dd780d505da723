"""Per-position next-token losses without materialising N × vocab logits.

At 32k tokens × 49k vocabulary the logits alone are 6.4 GB in fp32 (docs/design.md,
"Perplexity versus length"), so the base model (`model.get_decoder()`) gives the final
hidden states and the loss goes through the LM head `chunk` rows at a time. The head's
post-processing is the family's, from ropelab.patches.model_facts (soft-capping, a scale,
...). `check_head` compares
against the model's own logits on a short input, so an architecture with some other
post-processing fails loudly instead of giving quietly wrong losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ropelab.patches.handle import probe_device  # inputs go where an accelerate-dispatched model computes


def _head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for final hidden states `hidden` (..., H), in float32."""
    from ropelab.patches.model_facts import logits_transform

    return logits_transform(model)(model.get_output_embeddings()(hidden).float())  # (..., V)


def hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (N, H) of a 1-D token tensor, from the base model."""
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids[None].to(probe_device(model)), use_cache=False, return_dict=True)
    return out.last_hidden_state[0]  # (N, H)


@torch.inference_mode()
def token_losses(model, input_ids, chunk: int = 1024) -> torch.Tensor:
    """Loss (nats, float32) of every next-token prediction: entry i is -log p(ids[i+1] | ids[:i+1]).

    Returns a CPU tensor of N - 1 values for N input tokens. `chunk` bounds the logits held
    at once to chunk × vocab; the result depends on it only through float rounding
    (BLAS blocks matmuls of different row counts differently; ~1e-7).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim != 1 or ids.numel() < 2:
        raise ValueError(f"input_ids.shape={tuple(ids.shape)}: need one sequence of at least 2 tokens")
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: must be >= 1")
    hidden = hidden_states(model, ids)[:-1]  # (N-1, H): position i predicts token i+1
    targets = ids[1:].to(hidden.device)
    losses = torch.empty(ids.numel() - 1, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        stop = min(start + chunk, hidden.shape[0])
        logits = _head_logits(model, hidden[start:stop])  # (chunk, V)
        losses[start:stop] = F.cross_entropy(logits, targets[start:stop], reduction="none").cpu()
    return losses


@torch.inference_mode()
def check_head(model, vocab_size: int | None = None, length: int = 16, atol: float = 1e-3) -> None:
    """Raise RuntimeError if `token_losses` disagrees with the model's own forward on a short input."""
    vocab = vocab_size or model.get_output_embeddings().weight.shape[0]
    ids = torch.arange(length) * 7 % vocab  # deterministic, no RNG state touched
    logits = model(input_ids=ids[None].to(probe_device(model)), use_cache=False).logits[0, :-1].float()
    direct = F.cross_entropy(logits, ids[1:].to(logits.device), reduction="none").cpu()
    mine = token_losses(model, ids)
    err = (direct - mine).abs().max().item()
    if err > atol:
        raise RuntimeError(
            f"{type(model).__name__}: chunked LM-head losses differ from the model's logits by {err:.3g} "
            f"(> {atol}); this architecture post-processes its logits in a way ropelab.evals does not know"
        )
