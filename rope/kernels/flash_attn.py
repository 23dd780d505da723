"""The flash-attn backend of `rotary_attention` (CUDA, float16/bfloat16): each part of a
plan (kernels/plan.py) is one `flash_attn_func` call, merged by the row log-sum-exp
(Dao 2023, "FlashAttention-2", github.com/Dao-AILab/flash-attention).

Two properties of flash-attn make each part one call, with no mask and no chunking:

* its causal mask is aligned to the bottom-right corner: with n queries and m keys, query
  t sits on key t + m - n. The queries here are always the last rows of the keys (the
  KV-cache setting), so a part with distances ≥ lo is its query rows against the keys
  ending lo before the end, in prefill and in decoding alike;
* `window_size=(left, 0)` keeps the keys `diagonal - left … diagonal`, which is a part's
  upper distance edge (the band's width, or the sliding window's).

A single query row (decoding) is called with its keys sliced to its window and neither
`causal` nor `window_size`: flash-attn's fast grouped-query decode path (query heads
folded into the row dimension, `seqlenq_ngroups_swapped` in its csrc/flash_attn/
flash_api.cpp) is taken only when no window edge is set.

Rows whose diagonal falls before the first key see nothing; their lse is set to -inf
here (flash-attn's own value for such a row is not -inf, and differs between versions).
Left padding is handled per sequence by dropping the padded keys (positions are already
in the rotations); that needs the pad counts on the host, one synchronisation per call,
so only padded batches pay it. Any other padding takes another backend.

Parts with a key range per row (DCA's chunks, sink and global key prefixes) are not a
flash-attn call: such a plan is not `usable` here (auto picks FlexAttention) and asking for
this backend by name is refused with the reason. Requires flash-attn ≥ 2.6 (`softcap`); flash-attn 3's `flash_attn_interface` has another
signature and return convention and is refused by name (use FlexAttention instead).
"""

from __future__ import annotations

import functools

import torch

from .merge import merge_into
from .plan import Plan

__all__ = ["installed", "check_version", "usable", "left_pads", "flash_attn_lse", "run", "MIN_VERSION"]

_NEG_INF = float("-inf")
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD = 256
MIN_VERSION = (2, 6)


def _module():
    import flash_attn

    return flash_attn


@functools.cache
def installed() -> bool:
    try:
        _module()
    except Exception:  # ImportError, or a wheel built for another torch/CUDA
        return False
    return True


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_version() -> None:
    """Raise a clear error when the installed flash-attn predates 2.6 (no `softcap`)."""
    version = getattr(_module(), "__version__", "0")
    if _version_tuple(version) < MIN_VERSION:
        raise RuntimeError(f"flash_attn.__version__={version!r}: ropelab needs flash-attn >= 2.6 (its flash_attn_func "
                           "takes `softcap` from 2.6 on); upgrade it (pip install 'flash-attn>=2.6') or uninstall it "
                           "to use the FlexAttention backend")


def left_pads(key_padding_mask: torch.Tensor) -> torch.Tensor | None:
    """Padded keys per sequence (B,) on the host when the mask is pure left padding, else None."""
    pads = (~key_padding_mask).sum(-1)
    S = key_padding_mask.shape[-1]
    expected = torch.arange(S, device=key_padding_mask.device)[None, :] >= pads[:, None]
    return pads.cpu() if torch.equal(expected, key_padding_mask) else None


def usable(plan: Plan) -> bool:
    """Whether this plan can run on flash-attn."""
    q, v = plan.query, plan.value
    return (
        q.device.type == "cuda"
        and q.dtype in DTYPES
        and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD
        and installed()
        and all(part.is_band for part in plan.parts)
        and (plan.key_padding_mask is None or left_pads(plan.key_padding_mask) is not None)
    )


def flash_attn_lse(q, k, v, *, window_left: int | None, scale: float, softcap: float | None):
    """Causal (bottom-right) attention with its row lse: q (B, H, n, D), k/v (B, Hkv, m, D)
    -> (out (B, H, n, D), lse (B, H, n) float32). One flash-attn call."""
    from flash_attn import flash_attn_func

    kwargs = dict(dropout_p=0.0, softmax_scale=scale, softcap=0.0 if softcap is None else softcap,
                  return_attn_probs=True)
    if q.shape[2] == 1:
        # One row sees the last window_left + 1 keys: slice them, set no causal/window edge.
        if window_left is not None:
            k, v = k[:, :, max(0, k.shape[2] - 1 - window_left) :], v[:, :, max(0, v.shape[2] - 1 - window_left) :]
    else:
        kwargs.update(causal=True, window_size=(-1 if window_left is None else window_left, 0))
    out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
    return out.transpose(1, 2), lse


def _part(q, k, v, window_left, scale, softcap):
    """One part: q's rows are aligned with the last keys; rows with no key get out 0, lse -inf."""
    n, m = q.shape[2], k.shape[2]
    if m == 0:
        out = q.new_zeros(q.shape[:3] + v.shape[-1:])
        return out, torch.full(q.shape[:3], _NEG_INF, dtype=torch.float32, device=q.device)
    out, lse = flash_attn_lse(q, k, v, window_left=window_left, scale=scale, softcap=softcap)
    lse = lse.float()
    if n > m:  # rows whose diagonal lies before key 0
        out[:, :, : n - m] = 0
        lse[..., : n - m] = _NEG_INF
    return out, lse


def run(plan: Plan) -> torch.Tensor:
    """(B, H, T, Dv) from the plan, one flash-attn call per part (per sequence when padded)."""
    ranged = [part.name for part in plan.parts if not part.is_band]
    if ranged:
        raise ValueError(f"backend='flash-attn': parts {ranged} have a key range per query row (DCA's chunks, "
                         "sink or global key prefixes), which flash-attn's causal/window calls cannot express; "
                         "use backend='flex' (chosen automatically on CUDA) or 'eager'")
    check_version()
    q_all, value = plan.query, plan.value
    B, H, T, D = q_all.shape
    S, Dv = value.shape[2], value.shape[-1]
    width = max(D, Dv)

    def fit(t):
        return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))

    if plan.key_padding_mask is None:
        batches = [(slice(None), 0)]
    else:  # one call per sequence, each without its padded keys (and padded rows, which stay 0)
        batches = [(slice(b, b + 1), int(p)) for b, p in enumerate(left_pads(plan.key_padding_mask).tolist())]
    q_first = S - T
    out = lse = None
    for part in plan.parts:
        # Rotated per part, so one part's copies are freed before the next part's are built.
        qp, kp = plan.rotated_queries(part, tables=False), plan.rotated_keys(part, tables=False)
        left = None if part.hi is None else part.hi - 1 - part.lo
        stop = S - part.lo  # the part's keys end lo before the last key
        for rows, pad in batches:
            t0 = max(part.first_row, pad - q_first)  # first row that is a real token and has keys here
            if t0 >= T:
                continue
            o, l = _part(fit(qp[rows, :, t0 - part.first_row :]),
                         fit(kp[rows, :, max(0, pad - part.key_start) : stop - part.key_start]),
                         fit(value[rows, :, max(part.key_start, pad) : stop]), left, plan.scale, plan.softcap)
            if out is None and len(batches) == 1 and t0 == 0:  # the first part covers every row: keep its buffers
                out, lse = o, l
                continue
            if out is None:
                out = q_all.new_zeros(B, H, T, width)
                lse = torch.full((B, H, T), _NEG_INF, dtype=torch.float32, device=q_all.device)
            if part is plan.parts[0]:
                out[rows, :, t0:] = o
                lse[rows, :, t0:] = l
            else:  # rows is a slice, so these are views: the merge writes into `out` itself
                lse[rows, :, t0:] = merge_into(out[rows, :, t0:], lse[rows, :, t0:], o, l)
        del qp, kp
    if out is None:  # every row is padding
        out = q_all.new_zeros(B, H, T, width)
    return out if width == Dv else out[..., :Dv]
