"""A request's attention choice (backend + parameters), validated: bad values raise RequestError(field, rule)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from smartdiff.shared.errors import RequestError

from . import EXACT, backend_names

DEFAULT_TOLERANCE = 2e-2  # auto: largest relative L2 error of a lossy backend against the exact one
DEFAULT_CDF_THRESHOLD = 0.98
# SpargeAttn's defaults: with a cumulative threshold, blocks whose mean pairwise cosine similarity is below 0.6
# are always kept; with top-k, only dissimilar ones below -0.1 are (the pooled scores rank everything else).
DEFAULT_SIM_THRESHOLD = {"cdf": 0.6, "topk": -0.1}


def _in_range(name: str, value: float | None, lo: float, hi: float, lo_open: bool) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        raise RequestError(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value:g}")


@dataclass(frozen=True)
class SpargeParams:
    """SpargeAttn knobs; None takes the default (cdf_threshold 0.98 unless topk is set; see DEFAULT_SIM_THRESHOLD)."""

    topk: float | None = None  # fraction of key blocks kept per query block, (0, 1]; set: top-k mode
    cdf_threshold: float | None = None  # cumulative pooled-attention mass kept per query block, (0, 1]
    sim_threshold: float | None = None  # blocks less self-similar than this are always kept, [-1, 1]
    pv_threshold: float | None = None  # skip P.V of a block below 2**-pv_threshold of the row max; None: off

    def __post_init__(self) -> None:
        _in_range("attention.sparge.topk", self.topk, 0.0, 1.0, lo_open=True)
        _in_range("attention.sparge.cdf_threshold", self.cdf_threshold, 0.0, 1.0, lo_open=True)
        _in_range("attention.sparge.sim_threshold", self.sim_threshold, -1.0, 1.0, lo_open=False)
        _in_range("attention.sparge.pv_threshold", self.pv_threshold, 0.0, 1e6, lo_open=True)

    @property
    def mode(self) -> str:
        return "topk" if self.topk is not None else "cdf"

    def resolved(self) -> "SpargeParams":
        """Every knob filled in with its default."""
        cdf = None if self.topk is not None else (self.cdf_threshold or DEFAULT_CDF_THRESHOLD)
        sim = self.sim_threshold if self.sim_threshold is not None else DEFAULT_SIM_THRESHOLD[self.mode]
        return replace(self, cdf_threshold=cdf, sim_threshold=sim)

    def summary(self) -> str:
        r = self.resolved()
        sel = f"topk {r.topk:g}" if r.topk is not None else f"cdf {r.cdf_threshold:g}"
        pv = f", pv {r.pv_threshold:g}" if r.pv_threshold is not None else ""
        return f"{sel}, sim {r.sim_threshold:g}{pv}"


@dataclass(frozen=True)
class AttentionChoice:
    """Which backend runs the DiT's self-attention for one request, with its parameters (validated on creation)."""

    backend: str = EXACT
    allow_fallback: bool = False  # run the exact backend instead of refusing when `backend` cannot run here
    tolerance: float = DEFAULT_TOLERANCE  # auto: accepted relative L2 error against the exact backend
    candidates: tuple[str, ...] = ()  # auto: backends to consider; empty: every allowed one
    sparge: SpargeParams = field(default_factory=SpargeParams)

    def __post_init__(self) -> None:
        names = backend_names()
        if self.backend not in names:
            raise RequestError("attention.backend", f"unknown backend {self.backend!r}; known: {', '.join(names)}")
        _in_range("attention.auto.tolerance", self.tolerance, 0.0, 1.0, lo_open=True)
        for c in self.candidates:
            if c not in names or c == "auto":
                known = ", ".join(n for n in names if n != "auto")
                raise RequestError("attention.auto.candidates", f"unknown candidate {c!r}; known: {known}")
        if len(set(self.candidates)) != len(self.candidates):
            raise RequestError("attention.auto.candidates", "must not repeat a backend")

    @classmethod
    def from_proto(cls, msg: Any, default_backend: str = EXACT,
                   default_tolerance: float = DEFAULT_TOLERANCE) -> "AttentionChoice":
        """From a smartdiff.denoiser.v1.AttentionConfig (unset fields -> the deployment defaults given)."""
        if msg is None:
            return cls(backend=default_backend, tolerance=default_tolerance)

        def opt(m: Any, name: str) -> float | None:
            return getattr(m, name) if m is not None and m.HasField(name) else None

        auto = msg.auto if msg.HasField("auto") else None
        sparge = msg.sparge if msg.HasField("sparge") else None
        tol = opt(auto, "tolerance")
        return cls(
            backend=msg.backend or default_backend, allow_fallback=msg.allow_fallback,
            tolerance=default_tolerance if tol is None else tol,
            candidates=tuple(auto.candidates) if auto is not None else (),
            sparge=SpargeParams(opt(sparge, "topk"), opt(sparge, "cdf_threshold"), opt(sparge, "sim_threshold"),
                                opt(sparge, "pv_threshold")),
        )
