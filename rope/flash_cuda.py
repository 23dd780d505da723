"""The CUDA path of `rotary_attention`: the near band and the far part of ReRoPE, Leaky
ReRoPE and SelfExtend as two flash-attn calls, merged by the row log-sum-exp
(shared/docs/design.md, "Attention kernels for the relative-position methods"; flash-attn:
Dao 2023, github.com/Dao-AILab/flash-attention, `flash_attn_func`).

Two properties of flash-attn make each part one call, with no mask and no chunking:

* its causal mask is aligned to the bottom-right corner: with n queries and m keys, query
  t sits on key t + m - n. The queries here are always the last rows of the keys (the
  KV-cache setting), so the near part is q against the keys up to the end, and the far
  part is q[rows ≥ w] against the keys ending w before the end (key i - w is then the
  query's diagonal), in prefill and in decoding alike;
* `window_size=(left, 0)` keeps the keys `diagonal - left … diagonal`: the near band is
  `left = w - 1` (and the sliding window's edge, whichever is nearer), the far part's
  sliding-window edge is `left = sliding_window - 1 - w`.

Rows whose diagonal falls before the first key see nothing; flash-attn returns 0 for
them and an lse that is not -inf, so those rows' lse is set to -inf here before merging
(the rows are known from the shapes). Left padding is handled per sequence by dropping the
padded keys (positions are already in the rotations, and the bottom-right alignment does
not care where the keys start); any other padding pattern takes the eager path.

flash-attn takes float16/bfloat16 on CUDA only, head size ≤ 256, and soft-capping
(≥ 2.6, the version the `cuda` extra pins). Everything else (float32, autograd, CPU) is
handled by `rope/attention.py`. The call itself sits behind `flash_attn_lse`, so the
decomposition is tested on CPU against the float64 reference with an emulation of
flash-attn's documented semantics (tests/rope/test_flash_cuda.py), and against the CPU
kernel on a real GPU where one exists.
"""

from __future__ import annotations

import functools

import torch

_NEG_INF = float("-inf")
_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD = 256


@functools.cache
def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a wheel built for another torch/CUDA
        return False
    return True


def left_pads(key_padding_mask: torch.Tensor) -> torch.Tensor | None:
    """Padded keys per sequence (B,) when the mask is pure left padding, else None."""
    pads = (~key_padding_mask).sum(-1)
    S = key_padding_mask.shape[-1]
    expected = torch.arange(S, device=key_padding_mask.device)[None, :] >= pads[:, None]
    return pads.cpu() if torch.equal(expected, key_padding_mask) else None


def usable(query: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None) -> bool:
    """Whether this call can take the flash-attn path."""
    return (
        query.device.type == "cuda"
        and query.dtype in _DTYPES
        and max(query.shape[-1], value.shape[-1]) <= _MAX_HEAD
        and flash_attn_installed()
        and (key_padding_mask is None or left_pads(key_padding_mask) is not None)
    )


def flash_attn_lse(q, k, v, *, window_left: int | None, scale: float, softcap: float | None):
    """Causal (bottom-right) attention with its row lse: q (B, H, n, D), k/v (B, Hkv, m, D)
    -> (out (B, H, n, D), lse (B, H, n) float32). One flash-attn call."""
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=0.0, softmax_scale=scale, causal=True,
        window_size=(-1 if window_left is None else window_left, 0),
        softcap=0.0 if softcap is None else softcap, return_attn_probs=True,
    )
    return out.transpose(1, 2), lse


def _part(q, k, v, window_left, scale, softcap):
    """One part: q's rows are aligned with the last keys; rows with no key get lse -inf."""
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


def two_part_attention(q_near, k_near, kn0, far, value, w, sliding_window, near_hi, key_padding_mask,
                       scale, softcap):
    """The flash-attn counterpart of `rotary_attention`'s CPU kernel, from its rotated inputs.

    q_near (B, H, T, D) rotated queries; k_near the rotated keys from index kn0 on;
    `far` = (q_far, k_far, kf0, tf0) or None: far queries from row tf0, far keys covering
    [kf0, S - w). `near_hi` is the near band's width (None: all keys). Returns (B, H, T, Dv).
    """
    from .attention import _merge_into

    B, H, T, D = q_near.shape
    S, Dv = value.shape[2], value.shape[-1]
    width = max(D, Dv)

    def fit(t):
        return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))

    near_left = None if near_hi is None else near_hi - 1
    far_left = None if sliding_window is None or far is None else sliding_window - 1 - w
    out = q_near.new_zeros(B, H, T, width)
    # Without padding the whole batch is one call per part; with left padding, one per
    # sequence, each without its padded keys (and padded query rows, which stay 0).
    if key_padding_mask is None:
        batches = [(slice(None), 0)]
    else:
        batches = [(slice(b, b + 1), int(pad)) for b, pad in enumerate(left_pads(key_padding_mask).tolist())]
    q_first = S - T
    for rows, pad in batches:
        t0 = max(0, pad - q_first)  # first query row that is a real token
        o, lse = _part(fit(q_near[rows, :, t0:]), fit(k_near[rows, :, max(0, pad - kn0):]),
                       fit(value[rows, :, max(kn0, pad):]), near_left, scale, softcap)
        if far is not None:
            q_far, k_far, kf0, tf0 = far
            f0 = max(tf0, t0)
            if f0 < T:
                o_far, l_far = _part(fit(q_far[rows, :, f0 - tf0:]), fit(k_far[rows, :, max(0, pad - kf0):]),
                                     fit(value[rows, :, max(kf0, pad): S - w]), far_left, scale, softcap)
                _merge_into(o[:, :, f0 - t0:], lse[..., f0 - t0:], o_far, l_far)
        out[rows, :, t0:] = o
    return out if width == Dv else out[..., :Dv]
