"""The build's first stage: collapse a trained model into its deploy form and say what changed.

The algebra lives with the blocks (`training.fusion`, `training.blocks`); this stage only counts,
by class name, the `Reparameterizable` parts whose `reparameterize()` changed them, so that a new
block type shows up in the manifest without an edit here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from nnslim.training.fusion import Reparameterizable, reparameterize_model
from nnslim.parameters import count_parameters


@dataclass(frozen=True)
class ReparamReport:
    """What re-parameterization did.

    Attributes:
        fused: Reparameterizable modules that changed, by class name (e.g. {"FasterFusionBlock": 5,
            "ConvNormAct": 3}: five FasterFusion units fused, three BatchNorms folded into convs).
    """

    parameters_before: int
    parameters_after: int
    fused: dict[str, int] = field(default_factory=dict)

    @property
    def faster_fusion_blocks_fused(self) -> int:
        return self.fused.get("FasterFusionBlock", 0)

    @property
    def batchnorms_folded(self) -> int:
        """A ConvNormAct changes exactly when it folds its BatchNorm (other norms stay)."""
        return self.fused.get("ConvNormAct", 0)

    def to_dict(self) -> dict:
        """The manifest's record. The two named counts are the keys manifests have always had (build
        reports and older readers use them); `fused` holds every class."""
        return {
            "faster_fusion_blocks_fused": self.faster_fusion_blocks_fused,
            "batchnorms_folded": self.batchnorms_folded,
            "fused": dict(sorted(self.fused.items())),
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
        }


def _changed(before: nn.Module, after: nn.Module) -> bool:
    """Whether re-parameterization changed a module: other tensors, or other values."""
    old, new = before.state_dict(), after.state_dict()
    if old.keys() != new.keys():
        return True
    return any(old[k].shape != new[k].shape or not torch.equal(old[k], new[k]) for k in old)


def count_reparameterized(model: nn.Module, deployed: nn.Module) -> dict[str, int]:
    """Reparameterizable submodules of `model` (the root excluded) that differ in `deployed`, by class."""
    after = dict(deployed.named_modules())
    counts = Counter(
        type(module).__name__
        for name, module in model.named_modules()
        if name and isinstance(module, Reparameterizable) and name in after and _changed(module, after[name])
    )
    return dict(counts)


def reparameterize_for_deploy(model: nn.Module) -> tuple[nn.Module, ReparamReport]:
    """A deploy-form copy of `model` (the original is left as it is) and what was fused."""
    deployed = reparameterize_model(model, inplace=False)
    return deployed, ReparamReport(
        parameters_before=count_parameters(model),
        parameters_after=count_parameters(deployed),
        fused=count_reparameterized(model, deployed),
    )
