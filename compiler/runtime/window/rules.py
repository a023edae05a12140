"""Window rules: a framework's whole sliding window (grid, overlap, tile weight, padding) as one
named record, so an engine reproduces the inference of the framework its model came from.

    rules     grid      step   tile weight                               padding
    nnunet    nnunet    0.5    Gaussian, sigma P/8, nnU-Net's (maximum 10)  0
    monai     monai     0.75   Gaussian, sigma P/8, MONAI's                 cval (0)

(`grid` and `blending` say what each rule is.) MONAI's `SlidingWindowInferer` defaults to
`overlap=0.25` (step 0.75) and `mode="constant"`; a MONAI bundle's engine records the bundle's own
`overlap`, `mode`, `sigma_scale` and `cval` instead (`stages.monai_bundle`).

The engine's manifest records its rules under `preprocessing.window` (`to_record`); `infer`
uses them unless told otherwise, and `--window`, `--step` and `--blending` choose others for any
engine (`resolve`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from nnslim.compiler.runtime.window.blending import BLENDING_MODES, Blending
from nnslim.errors import EngineError


@dataclass(frozen=True)
class WindowRules:
    """One framework's sliding window (module docstring)."""

    name: str
    step_fraction: float
    blending: Blending
    pad_value: float = 0.0

    def to_record(self) -> dict[str, Any]:
        """The manifest's `preprocessing.window` entry."""
        return {"rules": self.name, "step_fraction": self.step_fraction, "blending": self.blending.mode,
                "sigma_scale": self.blending.sigma_scale, "pad_value": self.pad_value}


WINDOW_RULES = {
    "nnunet": WindowRules("nnunet", 0.5, Blending()),
    "monai": WindowRules("monai", 0.75, Blending(rule="monai")),
}


def from_record(record: dict[str, Any] | None) -> WindowRules:
    """The rules a manifest records (nnU-Net's when it records none)."""
    if not record:
        return WINDOW_RULES["nnunet"]
    name = record.get("rules")
    if name not in WINDOW_RULES:
        raise EngineError(f"the manifest's window rules {name!r} are not known to this nnslim ({', '.join(WINDOW_RULES)}); "
                          "upgrade nnslim")
    step, sigma, pad = record.get("step_fraction"), record.get("sigma_scale"), record.get("pad_value", 0.0)
    mode = record.get("blending")
    numbers = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (step, sigma, pad))
    if not numbers or not 0 < step <= 1 or sigma <= 0 or mode not in BLENDING_MODES:
        raise EngineError(f"the manifest's window record {record} is malformed: step_fraction in (0, 1], sigma_scale > 0, "
                          f"pad_value a number, blending one of {BLENDING_MODES}; rebuild the engine")
    return WindowRules(name, float(step), Blending(mode, float(sigma), rule=name), float(pad))


def resolve(recorded: WindowRules, rules: str | None = None, step_fraction: float | None = None,
            blending: str | None = None) -> WindowRules:
    """The engine's rules with a user's choices on top: `rules` another rule set (with its own
    defaults), `step_fraction` and `blending` (a mode) one setting each."""
    base = recorded if rules in (None, recorded.name) else WINDOW_RULES[rules]
    if step_fraction is not None:
        base = dataclasses.replace(base, step_fraction=float(step_fraction))
    if blending is not None:
        base = dataclasses.replace(base, blending=dataclasses.replace(base.blending, mode=blending))
    return base
