"""The build's first stage: collapse a trained model into its deploy form and say what changed.

The algebra lives with the blocks (`training.reparam`, `training.blocks`); this stage counts
what it fused so the manifest can record it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from nnslim.training.blocks import ConvNormAct, FasterFusionBlock
from nnslim.training.fusion import reparameterize_model
from nnslim.training.unet import count_parameters


@dataclass(frozen=True)
class ReparamReport:
    faster_fusion_blocks_fused: int
    batchnorms_folded: int
    parameters_before: int
    parameters_after: int

    def to_dict(self) -> dict:
        return asdict(self)


def reparameterize_for_deploy(model: nn.Module) -> tuple[nn.Module, ReparamReport]:
    """A deploy-form copy of `model` (the original is left as it is) and what was fused."""
    fusions = sum(isinstance(m, FasterFusionBlock) and not m.deploy for m in model.modules())
    folds = sum(isinstance(m, ConvNormAct) and isinstance(m.norm, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    deployed = reparameterize_model(model, inplace=False)
    return deployed, ReparamReport(
        faster_fusion_blocks_fused=fusions,
        batchnorms_folded=folds,
        parameters_before=count_parameters(model),
        parameters_after=count_parameters(deployed),
    )
