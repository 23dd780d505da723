"""A distance band lo ≤ i - j < hi over many query rows in three calls of torch's CPU flash
kernel, the query chunks stacked as the kernel's batch (the band strategy of
rope/kernels/cpu.py, batched; kernel: Dao 2023, "FlashAttention-2", as torch runs it on
the CPU).

The rows are cut into chunks of R < W = hi - lo rows. Row t of chunk c, whose keys start
at key index s_c + t (s_c = j0 + c·R), sees the W keys [s_c + t, s_c + t + W), which split
into three shapes shared by every chunk:

* keys [s_c + W - 1, s_c + W - 1 + R), u ≤ t: a top-left causal triangle;
* keys [s_c, s_c + R), u ≥ t: a top-left causal triangle once rows and keys are both
  reversed (the rows' queries and the keys are flipped once for all chunks: reversing all
  rows reverses each chunk and the order of the chunks);
* keys [s_c + R, s_c + W - 1): a rectangle every row sees (absent when R = W - 1).

Each shape is one kernel call over all chunks: strided views put chunk c at batch index c
(no copy; neighbouring chunks' rectangles overlap in memory, which the kernel only reads).
The three results are merged by row log-sum-exp straight into the caller's buffers.

Why: one call per shape and chunk (the unbatched strategy) costs a call, a flip of a
block of q, k and v and a merge per chunk, each an op the threads synchronise on; and the
kernel computes a causal triangle in whole 512-key blocks, so a triangle of R ≤ 512 rows
costs R² scores for R²/2 kept. Smaller R would waste less in the triangles, but the
kernel's smaller query tiles cost about as much in the rectangle: 64 to 512 rows timed
alike (contended, 8k, widths 1024 and 2048); kernels/cpu.py's BandSettings picks R and
how many rows one batch holds.
"""

from __future__ import annotations

import torch

from .cpu_flash import flash_attention_lse
from .merge import merge_all

__all__ = ["band_rows", "attend_band"]


def band_rows(width: int, rows: int) -> int:
    """Rows per chunk for a band `width` keys wide: at most `rows`, below the width."""
    return max(1, min(rows, width - 1))


def _chunks(x: torch.Tensor, start: int, length: int, count: int, step: int) -> torch.Tensor:
    """x (1, h, n, d) → (count, h, length, d): chunk c is x[0, :, start + c·step :][:length]."""
    _, h, _, d = x.shape
    s_b, s_h, s_n, s_d = x.stride()
    return x.as_strided((count, h, length, d), (step * s_n, s_h, s_n, s_d), x.storage_offset() + start * s_n)


def attend_band(q, k, v, j0: int, width: int, rows: int, scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Rows of q (1, H, N, D), N a multiple of `rows` < width, over their band: row t sees
    keys [j0 + t, j0 + t + width) of k, v (1, Hkv, K, D). Writes the attention into out
    (H, N, Dv) and its row log-sum-exp into lse (H, N) (views of the caller's buffers)."""
    R, W = rows, width
    nc = q.shape[2] // R
    H = q.shape[1]

    def dest(x):  # (H, N, ...) -> (nc, H, R, ...) view
        return x.unflatten(1, (nc, R)).transpose(0, 1)

    qc = _chunks(q, 0, R, nc, R)
    pieces = [flash_attention_lse(qc, _chunks(k, j0 + W - 1, R, nc, R), _chunks(v, j0 + W - 1, R, nc, R),
                                  is_causal=True, scale=scale)]
    # Upper triangles: reversed rows and keys. Chunk c of the reversed rows is chunk nc-1-c.
    qf = q.flip(2)
    kf, vf = k[:, :, j0 : j0 + nc * R].flip(2), v[:, :, j0 : j0 + nc * R].flip(2)
    o, l = flash_attention_lse(_chunks(qf, 0, R, nc, R), _chunks(kf, 0, R, nc, R), _chunks(vf, 0, R, nc, R),
                               is_causal=True, scale=scale)
    del qf, kf, vf
    pieces.append((o.flip(0, 2), l.flip(0, 2)))
    del o, l
    if W - 1 > R:
        pieces.append(flash_attention_lse(qc, _chunks(k, j0 + R, W - 1 - R, nc, R),
                                          _chunks(v, j0 + R, W - 1 - R, nc, R), scale=scale))
    merge_all(dest(out), dest(lse), pieces)
