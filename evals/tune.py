"""Choosing a method's parameters by measurement: a grid on discrete parameters,
golden-section search (Kiefer 1953, "Sequential minimax search for a maximum") on continuous
ones, over an evaluation callable.

Every evaluation goes through one cache keyed by the method's spec (`ntk:scale=3.2`): values
already in the cache are not evaluated again, and each new one is handed to `on_result` as
soon as it exists, so the caller can store it (a result store) and a rerun with the stored
values as the cache resumes where it stopped. The search is deterministic: the same ranges
give the same sequence of points, so a resumed search asks for the same specs.

Ranges are checked before any evaluation by constructing the method at their ends (and at
every grid value) with `ropelab.get_method`, so a range that crosses a parameter's rule
(`yarn` scale below 1, `beta-base` beta above 1) is refused with the method's own message.

Rule-based starting points at no compute cost are `ropelab suggest` (evals/suggest.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import ropelab

GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618…: each step keeps this fraction of the bracket
SIGNIFICANT = 4  # continuous values are rounded to 4 significant digits, so resumed runs hit the cache


@dataclass(frozen=True)
class Grid:
    """Discrete values, all evaluated."""

    values: tuple

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("values=(): a grid needs at least one value")


@dataclass(frozen=True)
class Continuous:
    """A continuous range searched by golden section; `log` searches log(value) (for scales)."""

    low: float
    high: float
    log: bool = False
    evaluations: int = 8  # golden-section steps: the bracket shrinks to 0.618^(n-2) of its width

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or not self.low < self.high:
            raise ValueError(f"range=[{self.low}, {self.high}]: empty; need low < high (both finite)")
        if self.log and self.low <= 0:
            raise ValueError(f"range=[{self.low}, {self.high}]: a log range needs low > 0")
        if self.evaluations < 3:
            raise ValueError(f"evaluations={self.evaluations}: golden section needs at least 3")


@dataclass(frozen=True)
class Evaluation:
    params: dict
    spec: str
    value: object  # a float or anything with `.mean` (an uncertainty.Continuous)
    cached: bool


def mean_of(value) -> float:
    return float(getattr(value, "mean", value))


def _round(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT}g}")


def tunable(name: str) -> list[str]:
    """A method's numeric parameters with a numeric or no default (what a search may vary).

    Left out: `train_length` (a fact about the model), booleans, nested methods, and
    parameters whose default is None (`rope`'s base: "the model's own"), so plain `rope`
    has nothing to tune.
    """
    cls = ropelab.method_class(name)
    numeric = ("int", "float", "float | None")
    return [f.name for f in dataclasses.fields(cls)
            if f.name != "train_length" and str(f.type) in numeric and f.default is not None]


class Search:
    """One method's search: ranges checked at construction, evaluations cached and reported."""

    def __init__(self, method: str, space: dict, objective, *, fixed: dict | None = None, cache: dict | None = None,
                 on_result=None):
        """method: a registered name. space: {parameter: Grid | Continuous}. objective: Method -> value
        (lower is better). fixed: parameters held constant. cache: {spec: value} from earlier runs."""
        self.method, self.fixed = method, dict(fixed or {})
        names = tunable(method)
        if not names:
            raise ValueError(f"method={method!r}: nothing to tune (no numeric parameters)")
        if not space:
            raise ValueError(f"space={{}}: give at least one of {method!r}'s parameters to search: {', '.join(names)}")
        for p, r in space.items():
            if p not in names:
                raise ValueError(f"{p}: not a tunable parameter of {method!r}; tunable: {', '.join(names)}")
            if not isinstance(r, (Grid, Continuous)):
                raise ValueError(f"{p}={r!r}: must be a Grid or a Continuous")
        self.space = space
        self.objective, self.cache, self.on_result = objective, dict(cache or {}), on_result
        self.evaluations: list[Evaluation] = []
        self._check_ranges()

    def _build(self, params: dict):
        return ropelab.get_method(self.method, **{**self.fixed, **params})

    def _check_ranges(self) -> None:
        """Construct the method at each range's ends and every grid value, the others at their first value."""
        base = {p: (r.values[0] if isinstance(r, Grid) else r.low) for p, r in self.space.items()}
        for p, r in self.space.items():
            for v in (r.values if isinstance(r, Grid) else (r.low, r.high)):
                try:
                    self._build({**base, p: v})
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"{p} range {self._describe(r)}: crosses {self.method!r}'s rule at {p}={v}: {exc}") from None

    @staticmethod
    def _describe(r) -> str:
        return f"{list(r.values)}" if isinstance(r, Grid) else f"[{r.low}, {r.high}]"

    def evaluate(self, params: dict):
        method = self._build(params)
        spec = method.spec()
        cached = spec in self.cache
        if not cached:
            self.cache[spec] = self.objective(method)
            if self.on_result is not None:
                self.on_result(spec, dict(params), self.cache[spec])
        self.evaluations.append(Evaluation(dict(params), spec, self.cache[spec], cached))
        return self.cache[spec]

    def _golden(self, name: str, r: Continuous, others: dict) -> tuple[float, object]:
        """Minimise over one continuous parameter, the others held; returns (best value of it, objective)."""
        f = (lambda t: math.exp(t)) if r.log else (lambda t: t)
        a, b = (math.log(r.low), math.log(r.high)) if r.log else (r.low, r.high)
        point = lambda t: _round(f(t))  # noqa: E731
        c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
        fc, fd = self.evaluate({**others, name: point(c)}), self.evaluate({**others, name: point(d)})
        for _ in range(r.evaluations - 2):
            if mean_of(fc) <= mean_of(fd):  # the minimum is in [a, d]
                b, d, fd = d, c, fc
                c = b - GOLDEN * (b - a)
                fc = self.evaluate({**others, name: point(c)})
            else:
                a, c, fc = c, d, fd
                d = a + GOLDEN * (b - a)
                fd = self.evaluate({**others, name: point(d)})
        return (point(c), fc) if mean_of(fc) <= mean_of(fd) else (point(d), fd)

    def run(self, rounds: int = 1) -> Evaluation:
        """Grid over the discrete parameters; at each grid point, golden section on each continuous
        parameter in turn (coordinate descent, `rounds` passes). Returns the best evaluation."""
        if rounds < 1:
            raise ValueError(f"rounds={rounds}: must be at least 1")
        grids = {p: r for p, r in self.space.items() if isinstance(r, Grid)}
        lines = {p: r for p, r in self.space.items() if isinstance(r, Continuous)}
        for combo in itertools.product(*(g.values for g in grids.values())):
            point = dict(zip(grids, combo))
            # continuous parameters start at their range's geometric or arithmetic middle
            current = {p: _round(math.sqrt(r.low * r.high) if r.log else (r.low + r.high) / 2) for p, r in lines.items()}
            if not lines:
                self.evaluate(point)
            for _ in range(rounds if len(lines) > 1 else 1):
                for p, r in lines.items():
                    others = {**point, **{q: v for q, v in current.items() if q != p}}
                    current[p], _ = self._golden(p, r, others)
        return self.best()

    def best(self) -> Evaluation:
        if not self.evaluations:
            raise ValueError("no evaluations yet: call run()")
        return min(self.evaluations, key=lambda e: mean_of(e.value))


def tune_figure(evaluations: list[Evaluation], parameter: str, *, default=None, title: str = "",
                ylabel: str = "loss (nats)"):
    """Loss over one parameter: every evaluation (with its interval when it has one), the best and the default marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted({(e.params[parameter], e.spec): e for e in evaluations if parameter in e.params}.values(),
                    key=lambda e: e.params[parameter])
    if not points:
        raise ValueError(f"parameter={parameter!r}: no evaluation varies it")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [e.params[parameter] for e in points]
    ys = [mean_of(e.value) for e in points]
    if all(hasattr(e.value, "low") for e in points):
        err = [[y - e.value.low for y, e in zip(ys, points)], [e.value.high - y for y, e in zip(ys, points)]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", ms=4, capsize=3, label="evaluations (95% interval)")
    else:
        ax.plot(xs, ys, "o", ms=4, label="evaluations")
    best = min(points, key=lambda e: mean_of(e.value))
    ax.plot([best.params[parameter]], [mean_of(best.value)], "*", ms=14, color="C3", label=f"best: {best.spec}")
    if default is not None:
        ax.axvline(default, color="grey", ls="--", lw=1, label=f"default {parameter}={default}")
    ax.set_xlabel(parameter)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig
