"""The flash-attn backend of `rotary_attention` (CUDA, float16/bfloat16): each part of a
plan (kernels/plan.py) is one flash-attn call, merged by the row log-sum-exp
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

Left padding (a `key_padding_mask` whose real keys are a suffix of each row) is one
`flash_attn_with_kvcache` call per part for the whole batch, with the padded key count of
each sequence as `cache_leftpad` (flash-attn ≥ 2.6.1) and every key as `cache_seqlens`
(see `flash_attn_lse` for why both): keys [cache_leftpad[b], m) are the sequence, and the
causal/window diagonal is aligned to its last key, so row t still sits on key t + m - n.
The pad counts stay on the device. Whether the mask is left padding:

* a single query row (a decoding step) takes the mask as left padding without looking at
  it, and a device-side assertion (`torch._assert_async`, which does not synchronise on
  CUDA) stops a mask that is not; being a device-side assertion, it leaves the process's
  CUDA context unusable (use backend="flex" for other padding);
* several query rows (prefill) may be right-padded, which another backend must take, so
  `usable` checks the mask on the host: one synchronisation, remembered for the mask's
  memory, so the layers of one forward (views of one mask) pay it once.

`flash_attn_varlen_func` is not used: its public signature takes no left pad, and packing
the real tokens needs their count on the host.

Parts with a key range per row (DCA's chunks, sink and global key prefixes) are not a
flash-attn call: such a plan is not `usable` here (auto picks FlexAttention) and asking for
this backend by name is refused with the reason. Requires flash-attn ≥ 2.6.1 (`softcap`
from 2.6.0, `cache_leftpad` from 2.6.1); flash-attn 3's `flash_attn_interface` has another
signature and return convention and is refused by name (use FlexAttention instead).
"""

from __future__ import annotations

import functools

import torch

from .merge import merge_into
from .plan import Plan

__all__ = ["installed", "check_version", "usable", "left_pads", "left_padded", "flash_attn_lse", "run",
           "MIN_VERSION"]

_NEG_INF = float("-inf")
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD = 256
MIN_VERSION = (2, 6, 1)


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
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_version() -> None:
    """Raise a clear error when the installed flash-attn predates 2.6.1."""
    version = getattr(_module(), "__version__", "0")
    if _version_tuple(version) < MIN_VERSION:
        raise RuntimeError(f"flash_attn.__version__={version!r}: ropelab needs flash-attn >= 2.6.1 (flash_attn_func "
                           "takes `softcap` from 2.6.0 on, flash_attn_with_kvcache takes `cache_leftpad` from 2.6.1 "
                           "on); upgrade it (pip install 'flash-attn>=2.6.1') or uninstall it to use the "
                           "FlexAttention backend")


def left_pads(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Padded keys per sequence, (B,) int32 on the mask's device (flash-attn's `cache_leftpad`
    dtype); meaningful when the mask is left padding. No host synchronisation."""
    return (~key_padding_mask).sum(-1, dtype=torch.int32)


def _is_left_padding(key_padding_mask: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on the device: every sequence's real keys are a suffix."""
    S = key_padding_mask.shape[-1]
    expected = torch.arange(S, device=key_padding_mask.device)[None, :] >= pads[:, None]
    return (expected == key_padding_mask).all()


# The last mask checked on the host, held so that its memory cannot be reused by another
# tensor while it is remembered: (mask, its version counter, verdict).
_last_checked: list = []


def left_padded(key_padding_mask: torch.Tensor) -> bool:
    """Whether the mask is pure left padding, read on the host (one synchronisation off the
    CPU), remembered for the mask's memory: views of one mask, as the layers of one forward
    get, are checked once."""
    mask = key_padding_mask
    if _last_checked:
        held, version, verdict = _last_checked[0]
        if (held.device == mask.device and held.data_ptr() == mask.data_ptr() and held.shape == mask.shape
                and held.stride() == mask.stride() and held._version == version):  # no in-place edit since
            return verdict
    verdict = bool(_is_left_padding(mask, left_pads(mask)))
    _last_checked[:] = [(mask, mask._version, verdict)]
    return verdict


def usable(plan: Plan) -> bool:
    """Whether this plan can run on flash-attn. A padded single-row (decoding) plan is taken
    without reading its mask (`run` asserts left padding on the device)."""
    q, v = plan.query, plan.value
    return (
        q.device.type == "cuda"
        and q.dtype in DTYPES
        and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD
        and installed()
        and all(part.is_band for part in plan.parts)
        and (plan.key_padding_mask is None or q.shape[2] == 1 or left_padded(plan.key_padding_mask))
    )


def flash_attn_lse(q, k, v, *, window_left: int | None, scale: float, softcap: float | None,
                   leftpad: torch.Tensor | None = None):
    """Causal (bottom-right) attention with its row lse: q (B, H, n, D), k/v (B, Hkv, m, D)
    -> (out (B, H, n, D), lse (B, H, n) float32). One flash-attn call: `flash_attn_func`, or
    with `leftpad` ((B,) int32, 0 ≤ leftpad ≤ m: sequence b's keys are [leftpad[b], m))
    `flash_attn_with_kvcache`, whose diagonal is aligned to each sequence's last key."""
    kwargs = dict(softmax_scale=scale, softcap=0.0 if softcap is None else softcap)
    if q.shape[2] == 1:
        # One row sees the last window_left + 1 keys: slice them, set no causal/window edge.
        if window_left is not None:
            start = max(0, k.shape[2] - 1 - window_left)
            k, v = k[:, :, start:], v[:, :, start:]
            if leftpad is not None and start:  # pads counted from the slice's first key
                leftpad = (leftpad - start).clamp_(min=0)
    else:
        kwargs.update(causal=True, window_size=(-1 if window_left is None else window_left, 0))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if leftpad is None:
        from flash_attn import flash_attn_func

        out, lse, _ = flash_attn_func(q, k, v, dropout_p=0.0, return_attn_probs=True, **kwargs)
    else:
        from flash_attn import flash_attn_with_kvcache

        # Its Python wrapper asserts a contiguous last dimension of the caches (no copy made).
        k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
        # cache_seqlens (every key; an int becomes a device tensor in the wrapper, no sync) is
        # passed on purpose: without it, key lengths that are a multiple of the kernel's block
        # take its "even" kernel, which neither bounds nor masks the keys a left pad shifts
        # past the end (flash-attn 2.6.1-2.8.3, is_even_MN in flash_fwd_launch_template.h;
        # its own tests always pass both).
        out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=k.shape[1], cache_leftpad=leftpad,
                                           return_softmax_lse=True, **kwargs)
    return out.transpose(1, 2), lse


def _part(q, k, v, window_left, scale, softcap, pads):
    """One part: q's rows are aligned with the last keys; `pads` ((B,) int32, or None) keys of
    each sequence, counted from k's first, are padding. Rows with no key get out 0, lse -inf."""
    n, m = q.shape[2], k.shape[2]
    if m == 0:
        out = q.new_zeros(q.shape[:3] + v.shape[-1:])
        return out, torch.full(q.shape[:3], _NEG_INF, dtype=torch.float32, device=q.device)
    leftpad = None if pads is None else pads.clamp(0, m)
    out, lse = flash_attn_lse(q, k, v, window_left=window_left, scale=scale, softcap=softcap, leftpad=leftpad)
    lse = lse.float()
    if leftpad is not None:
        # Row t sits on key t + m - n; before the sequence's first real key it sees nothing
        # (flash-attn writes 0 to such a row's output, but not -inf to its lse).
        empty = torch.arange(m - n, m, device=q.device)[None, :] < leftpad[:, None]  # (B, n)
        lse.masked_fill_(empty[:, None, :], _NEG_INF)
    elif n > m:  # rows whose diagonal lies before key 0
        out[:, :, : n - m] = 0
        lse[..., : n - m] = _NEG_INF
    return out, lse


def run(plan: Plan) -> torch.Tensor:
    """(B, H, T, Dv) from the plan, one flash-attn call per part for the whole batch."""
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
    rule = ("backend='flash-attn' takes left padding only (each sequence's real keys a suffix of its row); "
            "use backend='flex', 'cpu' or 'eager' for other padding")
    pads = None
    if plan.key_padding_mask is not None:
        mask = plan.key_padding_mask
        pads = left_pads(mask)
        if T == 1:  # decoding: checked on the device, no synchronisation
            torch._assert_async(_is_left_padding(mask, pads), f"key_padding_mask: {rule}")
        elif not left_padded(mask):  # remembered from `usable` for this mask: no second read
            raise ValueError(f"key_padding_mask: not left padding; {rule}")

    def fit(t):
        return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))

    out = lse = None
    for part in plan.parts:
        # Rotated per part, so one part's copies are freed before the next part's are built.
        qp, kp = plan.rotated_queries(part, tables=False), plan.rotated_keys(part, tables=False)
        left = None if part.hi is None else part.hi - 1 - part.lo
        stop = S - part.lo  # the part's keys end lo before the last key
        o, l = _part(fit(qp), fit(kp[:, :, : stop - part.key_start]), fit(value[:, :, part.key_start : stop]), left,
                     plan.scale, plan.softcap, None if pads is None else pads - part.key_start)
        del qp, kp
        t0 = part.first_row
        if out is None and t0 == 0:  # the first part covers every row: keep its buffers
            out, lse = o, l
            continue
        if out is None:
            out = q_all.new_zeros(B, H, T, width)
            lse = torch.full((B, H, T), _NEG_INF, dtype=torch.float32, device=q_all.device)
        if part is plan.parts[0]:
            out[:, :, t0:] = o
            lse[:, :, t0:] = l
        else:  # views: the merge writes into `out` itself
            lse[:, :, t0:] = merge_into(out[:, :, t0:], lse[:, :, t0:], o, l)
    if out is None:  # no part
        out = q_all.new_zeros(B, H, T, width)
    return out if width == Dv else out[..., :Dv]
