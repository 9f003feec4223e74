"""Published FlexCache coefficients for the Wan models, and a deployment's own calibration (YAML) for the rest.

TeaCache polynomials are TeaCache4Wan2.1's (ali-vilab/TeaCache), MagCache magnitude ratios MagCache4Wan2.1 /
MagCache4Wan2.2's (Zehong-Ma/MagCache); both were fitted on the real checkpoints with 50 (Wan2.1) or 40
(Wan2.2) steps. Wan2.2 has no published TeaCache polynomial: `smartdiff calibrate-cache` fits one per expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from smartdiff.shared.config import ModelConfig

# Architectures the published numbers belong to: (dim, num_layers, num_experts) -> table key.
ARCHITECTURES = {(1536, 30, 1): "Wan2.1-T2V-1.3B", (5120, 40, 1): "Wan2.1-T2V-14B", (5120, 40, 2): "Wan2.2-T2V-A14B"}

# TeaCache rescaling polynomials, highest degree first: (timestep-embedding mode, ret-steps mode).
TEACACHE_COEFFICIENTS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "Wan2.1-T2V-1.3B": (
        (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
        (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    ),
    "Wan2.1-T2V-14B": (
        (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
        (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    ),
}
# The "fast" thresholds of TeaCache4Wan2.1's T2V tables: (timestep-embedding mode, ret-steps mode).
TEACACHE_THRESHOLDS = {"Wan2.1-T2V-1.3B": (0.08, 0.10), "Wan2.1-T2V-14B": (0.20, 0.20)}
TEACACHE_DEFAULT_THRESHOLD = 0.10  # models without a published one (ours, not measured on real weights)

# MagCache defaults (threshold, max skip steps K, retention ratio) from the references' T2V commands.
MAGCACHE_DEFAULTS = {
    "Wan2.1-T2V-1.3B": (0.12, 2, 0.2),
    "Wan2.1-T2V-14B": (0.24, 6, 0.2),
    "Wan2.2-T2V-A14B": (0.06, 2, 0.4),
}
MAGCACHE_DEFAULT = (0.12, 2, 0.2)

# MagCache mean magnitude ratio ||r_i|| / ||r_(i-1)|| of the block-stack residual r at step i, per CFG branch
# (cond, uncond), for the reference step count (step 0 padded with 1.0). Wan2.2's runs across both experts.
MAGCACHE_RATIOS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "Wan2.1-T2V-1.3B": (
        (
            1.0, 1.0124, 1.00166, 0.99791, 0.99682, 0.99634, 0.99567, 0.99416, 0.99578, 0.9957, 0.99511,
            0.99535, 0.99552, 0.99541, 0.9954, 0.99489, 0.99518, 0.99484, 0.99481, 0.99415, 0.99419, 0.99396,
            0.99388, 0.99349, 0.99309, 0.9927, 0.99228, 0.99171, 0.99137, 0.99068, 0.99005, 0.98944, 0.98849,
            0.98758, 0.98644, 0.98504, 0.9836, 0.98202, 0.97977, 0.97717, 0.9741, 0.97003, 0.96538, 0.9593,
            0.95086, 0.94013, 0.92402, 0.90241, 0.86821, 0.81838,
        ),
        (
            1.0, 1.02213, 1.0041, 1.00061, 0.99762, 0.99685, 0.99586, 0.99422, 0.99575, 0.99563, 0.99506,
            0.99531, 0.99549, 0.99539, 0.99536, 0.99485, 0.99514, 0.99478, 0.99479, 0.99413, 0.99416, 0.99393,
            0.99386, 0.99349, 0.99304, 0.9927, 0.99226, 0.9917, 0.99135, 0.99063, 0.99003, 0.98942, 0.98849,
            0.98757, 0.98643, 0.98503, 0.98359, 0.98201, 0.97978, 0.97718, 0.97411, 0.97002, 0.96541, 0.95933,
            0.95089, 0.94019, 0.92414, 0.9026, 0.86868, 0.81939,
        ),
    ),
    "Wan2.1-T2V-14B": (
        (
            1.0, 1.02504, 1.00025, 0.9985, 0.99779, 0.9966, 0.99482, 0.99467, 0.99664, 0.99434, 0.99533,
            0.99468, 0.99438, 0.99516, 0.99384, 0.99404, 0.99517, 0.99409, 0.99428, 0.99347, 0.99418, 0.99271,
            0.99313, 0.99215, 0.99218, 0.99216, 0.99163, 0.99138, 0.98982, 0.98996, 0.9887, 0.98772, 0.98767,
            0.98573, 0.98501, 0.9838, 0.98177, 0.98037, 0.97678, 0.97546, 0.97184, 0.96711, 0.96349, 0.95629,
            0.94926, 0.93964, 0.92511, 0.90693, 0.8796, 0.86111,
        ),
        (
            1.0, 1.03017, 1.00251, 0.99962, 0.99771, 0.99658, 0.99476, 0.99451, 0.99656, 0.99431, 0.99545,
            0.99465, 0.99434, 0.99517, 0.9938, 0.99401, 0.99516, 0.99408, 0.99426, 0.99343, 0.99416, 0.99269,
            0.99311, 0.99215, 0.99215, 0.99217, 0.99161, 0.99135, 0.9898, 0.98995, 0.98866, 0.9877, 0.98765,
            0.9857, 0.98498, 0.98376, 0.98173, 0.98035, 0.97677, 0.97543, 0.97183, 0.96708, 0.96345, 0.95625,
            0.94929, 0.93961, 0.92504, 0.90678, 0.87945, 0.86189,
        ),
    ),
    "Wan2.2-T2V-A14B": (
        (
            1.0, 1.00124, 0.99822, 0.99696, 0.99703, 0.9966, 0.99602, 0.99578, 0.99484, 0.99633, 0.99659,
            0.99534, 0.99584, 0.99681, 0.99563, 0.9944, 0.99594, 0.99466, 0.99453, 0.99389, 0.99391, 0.99354,
            0.99283, 0.99268, 0.99057, 0.99125, 0.65523, 0.98808, 0.98765, 0.9851, 0.98311, 0.9805, 0.97776,
            0.97278, 0.96731, 0.95857, 0.94385, 0.92118, 0.88108, 0.80263,
        ),
        (
            1.0, 1.00155, 0.99851, 0.99687, 0.99732, 0.99679, 0.99658, 0.99664, 0.9949, 0.996, 0.99683,
            0.99549, 0.99577, 0.99694, 0.99554, 0.99473, 0.9964, 0.99461, 0.99481, 0.99365, 0.99406, 0.99361,
            0.99278, 0.99263, 0.99091, 0.99126, 0.65252, 0.98852, 0.98736, 0.98535, 0.98339, 0.9806, 0.97771,
            0.97286, 0.96728, 0.95855, 0.94385, 0.921, 0.88076, 0.80181,
        ),
    ),
}


def published_key(model: ModelConfig) -> str | None:
    """The key of `model`'s published numbers (by DiT architecture), or None."""
    return ARCHITECTURES.get((model.dit.dim, model.dit.num_layers, model.num_experts))


def nearest_resample(values: tuple[float, ...] | list[float], length: int) -> list[float]:
    """Resample a per-step table to `length` steps by nearest index (as MagCache does for other step counts)."""
    import numpy as np

    src = np.asarray(values, dtype=np.float64)
    if length == 1:
        return [float(src[-1])]
    idx = np.round(np.arange(length) * (len(src) - 1) / (length - 1)).astype(int)
    return [float(v) for v in src[idx]]


@dataclass(frozen=True)
class CacheCalibration:
    """A deployment's fitted numbers for one model (what `smartdiff calibrate-cache` writes).

    teacache[k] = (embedding-mode polynomial, ret-steps-mode polynomial) of expert k, highest degree first;
    magcache = (cond ratios, uncond ratios) per step of `steps`-step runs, across experts;
    reuse_error = (cond, uncond) tables: [step][d - 1] the RMS error of the model output when that step reuses
    the block-stack residual of the step d earlier (inf where that step belongs to another expert), measured on
    the schedule `timesteps`.
    """

    model: str
    steps: int
    teacache: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = ()
    magcache: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    reuse_error: tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]] | None = None
    timesteps: tuple[float, ...] | None = None  # the schedule reuse_error was measured on (None: any of `steps`)
    notes: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: need >= 1, got {self.steps}")
        for k, polys in enumerate(self.teacache):
            for name, poly in zip(("coefficients", "ret_steps_coefficients"), polys):
                if not poly or not all(math.isfinite(v) for v in poly):
                    raise ValueError(f"teacache expert {k} {name}: need >= 1 finite values, got {list(poly)}")
        if self.magcache is not None:
            for name, ratios in zip(("cond", "uncond"), self.magcache):
                if not ratios or not all(math.isfinite(v) and v > 0 for v in ratios):
                    raise ValueError(f"magcache {name}: need >= 1 finite, positive ratios, got {list(ratios)}")
                if len(ratios) != self.steps:
                    raise ValueError(f"magcache {name}: need one ratio per step ({self.steps}), got {len(ratios)}")
        if self.reuse_error is not None:
            if len(self.reuse_error) != 2 or any(len(t) != self.steps for t in self.reuse_error):
                raise ValueError(f"reuse_error: need cond and uncond tables of {self.steps} steps each")
            if len({len(row) for t in self.reuse_error for row in t}) != 1 or not self.reuse_error[0][0]:
                raise ValueError("reuse_error: every step needs the same number (>= 1) of distances")
        if self.timesteps is not None and len(self.timesteps) != self.steps:
            raise ValueError(f"timesteps: need {self.steps}, got {len(self.timesteps)}")

    def to_yaml(self, path: Path) -> None:
        data = {
            "model": self.model,
            "steps": self.steps,
            "teacache": [{"expert": k, "coefficients": list(c), "ret_steps_coefficients": list(r)}
                         for k, (c, r) in enumerate(self.teacache)],
            "magcache": None if self.magcache is None else {"cond": list(self.magcache[0]),
                                                            "uncond": list(self.magcache[1])},
            "reuse_error": None if self.reuse_error is None else {
                branch: [list(row) for row in table] for branch, table in zip(("cond", "uncond"), self.reuse_error)},
            "timesteps": None if self.timesteps is None else list(self.timesteps),
            "notes": dict(self.notes),
        }
        header = f"# FlexCache calibration of {self.model} (smartdiff calibrate-cache); read by the denoiser.\n"
        Path(path).write_text(header + yaml.safe_dump(data, sort_keys=False, width=120))

    @classmethod
    def from_yaml(cls, path: Path) -> CacheCalibration:
        """ValueError naming the file for anything unreadable or not a valid calibration."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:  # (nesting deeper than Python's)
            raise ValueError(f"{path}: cannot read it ({type(e).__name__}: "
                             f"{(str(e).splitlines() or ['nested too deeply'])[0]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a FlexCache calibration file (a YAML mapping from smartdiff "
                             f"calibrate-cache), got {type(data).__name__}")
        try:
            teacache = tuple(
                (tuple(float(v) for v in e["coefficients"]), tuple(float(v) for v in e["ret_steps_coefficients"]))
                for e in sorted(data.get("teacache") or [], key=lambda e: e["expert"])
            )
            mag = data.get("magcache")
            magcache = None if not mag else (tuple(map(float, mag["cond"])), tuple(map(float, mag["uncond"])))
            err = data.get("reuse_error")
            reuse = None if not err else tuple(tuple(tuple(float(v) for v in row) for row in err[branch])
                                               for branch in ("cond", "uncond"))
            times = data.get("timesteps")
            if isinstance(data["steps"], bool) or not isinstance(data["steps"], int):
                raise ValueError(f"steps must be an integer, got {data['steps']!r}")
            return cls(str(data["model"]), data["steps"], teacache, magcache, reuse,
                       None if times is None else tuple(float(t) for t in times), dict(data.get("notes") or {}))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ValueError(f"{path}: not a valid FlexCache calibration ({type(e).__name__}: {e})") from None
