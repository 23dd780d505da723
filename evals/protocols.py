"""Perplexity protocols as registered objects: each owns its description, the parameters that
change its numbers, the forward lengths a job needs, its scoring, how a summary reads its
records, and its axis label. Adding a protocol is one class and one `register` call here;
the CLI's `--protocol` choices come from `names()`.

- `fixed-target` (the headline curve; bojone/rerope's protocol, its README table "loss on
  the last 4096 tokens"): each document is cut to a window of W = max(lengths) tokens; for
  each context length N the model reads the last N tokens of the window and the score is
  the mean loss on the window's last K = `targets` tokens, the same tokens for every N.
- `position`: one forward over the W-token window keeps the loss at every position; the
  score for length N is the token-weighted mean over the first N - 1 predictions. A
  prefix-consistent method serves every N from that forward; a length-dependent method
  (`method.length_dependent`, e.g. `dynamic-ntk`) gets one forward per N.
- `sliding` (YaRN's eval, jquesnelle/yarn `eval/perplexity.py`, after the HuggingFace
  perplexity guide): windows of N tokens advanced by `stride` over each W-token document;
  each token is scored once, in the first window that reaches it. The stride must be below
  every N, or the first token of a window would be scored by no window. We report the
  token-weighted mean; yarn's script averages window means, which weights short windows more.

Design notes: docs/design.md, "Perplexity versus length".
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .data import SHORT_POLICIES
from .losses import token_losses


class PerplexityProtocol:
    """The base: subclasses set `name`, `description`, `fields` and override what differs."""

    name = ""
    description = ""
    fields: tuple[str, ...] = ()  # the settings besides the window that change the numbers

    def check(self, settings: "Protocol", lengths: list[int]) -> None:
        for n in lengths:
            if not 2 <= n <= settings.window:
                raise ValueError(f"length={n}: must be between 2 and the window W={settings.window}")

    def forward_lengths(self, settings: "Protocol", method, lengths: list[int]) -> list[int]:
        return sorted(lengths)

    def served(self, settings: "Protocol", method, n: int, lengths: list[int]) -> list[int]:
        """The lengths whose score this forward of length n gives."""
        return [n]

    def losses(self, settings: "Protocol", model, ids: list[int], n: int, chunk: int) -> tuple[list[float], list[float], int]:
        """(all per-position losses kept, the scored ones, forwards)."""
        raise NotImplementedError

    def contribution(self, record: dict, n: int) -> tuple[float, int] | None:
        """(sum of losses, tokens) that an ok record contributes to the score at length n, or None."""
        if record["length"] != n:
            return None
        return record["loss"] * record["scored_tokens"], record["scored_tokens"]

    def axis_label(self, header: dict) -> str:
        return "loss"


class FixedTarget(PerplexityProtocol):
    name = "fixed-target"
    description = ("fixed targets, growing context (bojone/rerope): for each N, one forward over the last N "
                   "tokens of each document's W-token window; score = mean loss on the window's last K tokens")
    fields = ("targets",)

    def check(self, settings, lengths):
        super().check(settings, lengths)
        for n in lengths:
            if n <= settings.targets:
                raise ValueError(f"length={n}: fixed-target needs every length > targets={settings.targets} "
                                 "(the K scored tokens need at least one token of context)")

    def losses(self, settings, model, ids, n, chunk):
        kept = token_losses(model, ids[len(ids) - n :], chunk).tolist()
        return kept, kept[-settings.targets :], 1

    def axis_label(self, header):
        return f"loss on the last {header.get('targets')} tokens"


class Position(PerplexityProtocol):
    name = "position"
    description = ("per position: one forward over each W-token window (one per N for length-dependent methods); "
                   "score for N = token-weighted mean loss of the predictions of tokens 1..N-1")

    def forward_lengths(self, settings, method, lengths):
        return sorted(lengths) if method.length_dependent else [settings.window]

    def served(self, settings, method, n, lengths):
        return [n] if method.length_dependent else [m for m in lengths if m <= n]

    def losses(self, settings, model, ids, n, chunk):
        kept = token_losses(model, ids[:n], chunk).tolist()
        return kept, kept, 1

    def contribution(self, record, n):
        if record["length"] == n or (record.get("prefix_consistent") and record["length"] >= n):
            part = record["losses"][: n - 1]
            return math.fsum(part), len(part)
        return None

    def axis_label(self, header):
        return "mean loss over the first N tokens"


class Sliding(PerplexityProtocol):
    name = "sliding"
    description = ("sliding window (YaRN eval): windows of N tokens, advanced by the stride over each W-token "
                   "document; every token scored once; score = token-weighted mean over the document")
    fields = ("stride",)

    def check(self, settings, lengths):
        super().check(settings, lengths)
        for n in lengths:
            if settings.stride >= n:
                raise ValueError(f"stride={settings.stride}: the sliding protocol needs stride < every length "
                                 f"(length={n}); a window's first token is scored only by an earlier window")

    def losses(self, settings, model, ids, n, chunk):
        kept, forwards, prev_end = [float("nan")] * (len(ids) - 1), 0, 0
        for begin in range(0, len(ids), settings.stride):
            end = min(begin + n, len(ids))
            window = token_losses(model, ids[begin:end], chunk)  # window[i] scores token begin+i+1
            for pos in range(max(prev_end, begin + 1), end):
                kept[pos - 1] = float(window[pos - begin - 1])
            forwards, prev_end = forwards + 1, end
            if end == len(ids):
                break
        return kept, kept, forwards

    def axis_label(self, header):
        return f"sliding-window loss (stride {header.get('stride')})"


_REGISTRY: dict[str, PerplexityProtocol] = {}


def register(protocol: PerplexityProtocol) -> PerplexityProtocol:
    _REGISTRY[protocol.name] = protocol
    return protocol


for _p in (FixedTarget(), Position(), Sliding()):
    register(_p)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> PerplexityProtocol:
    if name not in _REGISTRY:
        raise ValueError(f"protocol={name!r}: must be one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


@dataclass(frozen=True)
class Protocol:
    """The settings of one perplexity run (recorded in the header of its result file)."""

    name: str = "fixed-target"
    window: int = 16384  # W: tokens taken from each document
    targets: int = 2048  # K, fixed-target only
    stride: int = 512  # sliding only
    data: str = "stdlib"
    short: str = "skip"  # policy for documents shorter than W: skip | concatenate

    def __post_init__(self) -> None:
        get(self.name)
        if self.short not in SHORT_POLICIES:
            raise ValueError(f"short={self.short!r}: must be one of {', '.join(SHORT_POLICIES)}")
        for name in ("window", "targets", "stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")

    @property
    def kind(self) -> PerplexityProtocol:
        return get(self.name)

    @property
    def description(self) -> str:
        return self.kind.description

    def params(self) -> dict:
        """The parameters that change a job's numbers (part of every job key and record)."""
        return {"protocol": self.name, "window": self.window, **{f: getattr(self, f) for f in self.kind.fields}}

    def check_lengths(self, lengths: list[int]) -> None:
        self.kind.check(self, lengths)

    def score(self, model, ids: list[int], n: int, chunk: int) -> dict:
        """One job's losses and score; ValueError when it scores no token or the loss is not finite."""
        start = time.perf_counter()
        kept, scored, forwards = self.kind.losses(self, model, ids, n, chunk)
        seconds = time.perf_counter() - start
        if not scored:
            raise ValueError(f"length={n}: the {self.name} protocol scored no token")
        loss = math.fsum(scored) / len(scored)
        if not math.isfinite(loss):
            raise ValueError(f"length={n}: the {self.name} protocol gave a non-finite loss ({loss})")
        tokens = len(ids) if self.name == "sliding" else n  # sliding: document tokens, each scored once
        return {"loss": loss, "ppl": float(torch.tensor(loss).exp()), "scored_tokens": len(scored),
                "forwards": forwards, "seconds": seconds, "tokens_per_second": tokens / seconds,
                "losses": [float(f"{x:.6g}") for x in kept]}
