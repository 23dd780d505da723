"""cos/sin tables and the rotation itself, as the kernels apply it (the formulas of
rope/rotary.py: float64 angles position × frequency, cast after cos and sin; Su et al.
2021, "RoFormer", arXiv 2104.09864).

Every decoding step rotates a few new rows and every layer does it with the same
frequencies, so on CPU the rows are looked up in a table computed once per (frequencies,
factor, dtype, device): float64 cos and sin of many angles took longer than the
attention over 8k keys. Tables cover the range of positions calls have asked for (grown
by a quarter beyond it, so a growing sequence rebuilds rarely) and are keyed by the
frequency tensor's identity, not its contents: no copy to the host, no hashing of bytes.
On other devices the rows are computed directly: finding a table's range would need the
positions on the host (a synchronisation per call), and the device computes a few rows
of float64 angles faster than it waits for one.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..rotary import angles

__all__ = ["cos_sin_rows", "rotate", "rotate_rows", "Rows", "frequencies_on", "TableCache"]

# Elements per table: 16 MB each for cos and sin in float32 (131k positions at d=64).
TABLE_LIMIT = 1 << 22
# Up to this many positions per call are remembered by value, not looked up in a table.
FEW_ROWS = 64


class TableCache:
    """cos/sin (n, d/2) over [start, start + n), per frequency tensor (by identity), factor, dtype."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, inv_freq: torch.Tensor, factor: float, dtype, lo: int, hi: int):
        """(start, cos, sin) covering positions [lo, hi], or None when too large to keep."""
        key = (id(inv_freq), float(factor), dtype)
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None and entry[0]() is not inv_freq:  # id reused by a new tensor
                entry = None
            if entry is not None and entry[1] <= lo and hi < entry[1] + entry[2].shape[0]:
                self.entries.move_to_end(key)
                return entry[1:]
        start, stop = lo, hi + 1  # the range this call needs (grown below), not from 0
        if entry is not None:
            start, stop = min(start, entry[1]), max(stop, entry[1] + entry[2].shape[0])
        stop += (stop - start) // 4
        if (stop - start) * inv_freq.numel() > TABLE_LIMIT:
            return None
        theta = angles(torch.arange(start, stop, device=inv_freq.device), inv_freq)
        entry = (weakref.ref(inv_freq), start, (theta.cos() * factor).to(dtype), (theta.sin() * factor).to(dtype))
        with self.lock:
            self.entries[key] = entry
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return entry[1:]


TABLES = TableCache(size=8)
# (frequencies id, factor, dtype, positions) -> (weakref to frequencies, cos, sin), for a few rows
ROWS: dict = {}


def cos_sin_rows(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float, dtype, tables: bool = True):
    """cos, sin (B, n, d/2) in `dtype` for positions (B, n) (integer, or float holding integers
    or not), both times `factor`. Same numbers whichever way they are found. `tables=False`
    computes them directly, with no synchronisation (what the device backends use)."""
    if tables and positions.device.type == "cpu" and positions.numel() <= FEW_ROWS:
        # A decoding step asks every layer for the same few rows: remember them by value
        # (reading a few CPU numbers costs no synchronisation), so 1 layer in N computes.
        key = (id(inv_freq), float(factor), dtype, positions.dtype, tuple(positions.shape),
               positions.detach().numpy().tobytes())
        hit = ROWS.get(key)
        if hit is not None and hit[0]() is inv_freq:
            return hit[1], hit[2]
        theta = angles(positions, inv_freq)
        cos, sin = (theta.cos() * factor).to(dtype), (theta.sin() * factor).to(dtype)
        ROWS[key] = (weakref.ref(inv_freq), cos, sin)
        if len(ROWS) > 64:
            ROWS.pop(next(iter(ROWS)))
        return cos, sin
    if tables and positions.device.type == "cpu":
        if positions.is_floating_point():
            rounded = positions.round()
            if torch.equal(rounded, positions):  # ReRoPE's w, SelfExtend's groups: integers
                positions = rounded.to(torch.int64)
        if not positions.is_floating_point():
            lo, hi = (int(x) for x in torch.aminmax(positions))
            entry = TABLES.get(inv_freq, factor, dtype, lo, hi)
            if entry is not None:
                start, cos, sin = entry
                index = positions - start
                return cos[index], sin[index]
    theta = angles(positions, inv_freq)
    return (theta.cos() * factor).to(dtype), (theta.sin() * factor).to(dtype)


def rotate(x, positions, inv_freq, factor, layout, dtype, row_scale=None, tables: bool = True):
    """x (B, H, n, D) rotated at positions (B, n) with `inv_freq`; cos and sin times `factor`
    and, when given, the whole row times `row_scale` (B, n) (log-n). Same result as
    `apply_rotary` with `cos_sin` tables: `rotate_rows` of `cos_sin_rows`."""
    cos, sin = cos_sin_rows(positions, inv_freq, factor, dtype, tables)
    return rotate_rows(x, cos, sin, layout, dtype, row_scale)


def rotate_rows(x, cos, sin, layout, dtype, row_scale=None):
    """x (B, H, n, D) rotated with cos, sin (B, n, d/2) from `cos_sin_rows` (the first d dims;
    the rest pass through), the whole row times `row_scale` (B, n) when given. A decoding
    step looks its rows up once and rotates every layer's new rows with them.

    Written as four fused multiply-adds into one buffer with half-width tables, because it
    runs over every query twice and `rotate_half`'s concatenations would cost as much again
    as the arithmetic.
    """
    half = cos.shape[-1]
    rotary_dim = 2 * half
    if row_scale is not None:
        cos, sin = cos * row_scale.to(dtype)[..., None], sin * row_scale.to(dtype)[..., None]
    cos, sin = cos[:, None], sin[:, None]
    if torch.is_grad_enabled() and x.requires_grad:  # out= ops cannot be differentiated
        if layout == "half":
            x1, x2 = x[..., :half], x[..., half:rotary_dim]
            rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
            rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        rest = x[..., rotary_dim:]
        if row_scale is not None:
            rest = rest * row_scale.to(dtype)[:, None, :, None]
        return torch.cat((rot, rest), dim=-1) if rotary_dim < x.shape[-1] else rot
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if layout == "half":
        x1, x2 = x[..., :half], x[..., half:rotary_dim]
        o1, o2 = out[..., :half], out[..., half:rotary_dim]
    else:
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        o1, o2 = out[..., 0:rotary_dim:2], out[..., 1:rotary_dim:2]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    if rotary_dim < x.shape[-1]:
        if row_scale is None:
            out[..., rotary_dim:].copy_(x[..., rotary_dim:])
        else:
            torch.mul(x[..., rotary_dim:], row_scale.to(dtype)[:, None, :, None], out=out[..., rotary_dim:])
    return out


@dataclass(frozen=True)
class Rows:
    """cos and sin of a few rows, looked up once to rotate many tensors at those rows (every
    layer of a decoding step rotates its new query and key rows at the same positions).

    Besides the half-width tables of `cos_sin_rows` it holds full-width ones with the sign
    of `rotate_half` folded into sin: a row whose dims are all rotary is then x·cos' +
    swap(x)·sin' (swap: the halves, or each pair, exchanged), three operations instead of
    `rotate_rows`' dozen. The same products and sums in the same order, so the same bits:
    x1·cos + x2·(-sin) is x1·cos - x2·sin exactly (negation is exact).
    """

    cos: torch.Tensor  # (B, n, d/2)
    sin: torch.Tensor
    layout: str
    full_cos: torch.Tensor  # (B, 1, n, d)
    signed_sin: torch.Tensor

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> Rows:
        if layout == "half":
            full_cos, signed_sin = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
        else:
            full_cos, signed_sin = torch.stack((cos, cos), -1).flatten(-2), torch.stack((-sin, sin), -1).flatten(-2)
        return cls(cos, sin, layout, full_cos[:, None], signed_sin[:, None])

    def rotate(self, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, H, n, D) rotated at these rows, in x's dtype (as `rotate_rows`)."""
        dim = self.full_cos.shape[-1]
        if row_scale is not None or x.shape[-1] != dim or x.dtype != self.cos.dtype or \
                (torch.is_grad_enabled() and x.requires_grad):
            return rotate_rows(x, self.cos, self.sin, self.layout, x.dtype, row_scale)
        if self.layout == "half":
            swapped = x.roll(dim // 2, -1)
        else:
            swapped = x.unflatten(-1, (dim // 2, 2)).flip(-1).flatten(-2)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.mul(x, self.full_cos, out=out)
        return out.addcmul_(swapped, self.signed_sin)


class _Derived:
    """Frequency tensors derived from a given one (moved to a device, divided by the far
    part's divisor), found again by the source's identity, so the table cache above, keyed
    by identity, is reused on the next call. Sources on the CPU with equal contents (every
    layer of a model has its own copy of the same frequencies) share one derived tensor,
    hence one table; reading a CPU tensor's bytes costs no synchronisation."""

    def __init__(self, size: int = 256):
        self.size = size
        self.by_id: OrderedDict = OrderedDict()
        self.by_content: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, inv_freq: torch.Tensor, device: torch.device, divisor: float) -> torch.Tensor:
        key = (id(inv_freq), str(device), float(divisor))
        with self.lock:
            entry = self.by_id.get(key)
            if entry is not None and entry[0]() is inv_freq:
                return entry[1]
        content = None
        if inv_freq.device.type == "cpu":
            content = (inv_freq.detach().to(torch.float64).numpy().tobytes(), str(device), float(divisor))
        with self.lock:
            derived = None if content is None else self.by_content.get(content)
        if derived is None:
            derived = inv_freq.to(device=device, dtype=torch.float64)
            if divisor != 1:
                derived = derived / divisor
        with self.lock:
            self.by_id[key] = (weakref.ref(inv_freq), derived)
            if content is not None:
                self.by_content[content] = derived
            for table in (self.by_id, self.by_content):
                while len(table) > self.size:
                    table.popitem(last=False)
        return derived


DERIVED = _Derived()


def frequencies_on(inv_freq: torch.Tensor, device: torch.device, divisor: float = 1.0) -> torch.Tensor:
    """inv_freq as float64 on `device`, divided by `divisor`; the same tensor object for the
    same source tensor, so tables keyed by identity are reused across calls and layers."""
    return DERIVED.get(inv_freq, device, divisor)
