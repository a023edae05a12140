"""Small MONAI bundles written by tests: the real layout (configs/metadata.json, configs/inference.json,
models/model.pt), MONAI's own network classes with random weights, and an output layer scaled so that
argmax is decisive. The config has what real bundles have and nnslim must leave alone: `$` imports,
`$` device and dtype expressions and `network: $@network_def.to(@device)`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NETWORKS: dict[str, dict[str, Any]] = {
    "unet": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [8, 16, 32],
             "strides": [2, 2], "num_res_units": 1, "norm": "batch"},
    "segresnet": {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "init_filters": 8,
                  "blocks_down": [1, 2, 2], "blocks_up": [1, 1]},
    "swinunetr": {"_target_": "SwinUNETR", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "feature_size": 12},
}
ROI = {"swinunetr": 64}  # SwinUNETR's windows need a multiple of 32; the others take 32

PREPROCESSING = [
    {"_target_": "LoadImaged", "keys": ["image", "label"], "allow_missing_keys": True},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True, "dtype": "$np.float32"},
    {"_target_": "EnsureTyped", "keys": "image"},
]


def network(definition: dict[str, Any]):
    """MONAI's network for a `network_def`, built as MONAI builds it."""
    from monai.bundle import ConfigParser

    return ConfigParser({"net": definition}).get_parsed_content("net")


def net_in(net) -> int:
    """The network's input channels (its first convolution's)."""
    import torch

    return next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d)).in_channels


def write_bundle(root: Path, kind: str = "unet", *, preprocessing: list | None = None, inferer: dict | None = None,
                 postprocessing: list | None = None, network_def: dict | None = None, hostile: bool = False,
                 scale: float = 20.0, seed: int = 0) -> Path:
    """A bundle folder at `root` (returned). A `hostile` network_def is written, never built: the
    weights are then `kind`'s."""
    import torch

    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    torch.manual_seed(seed)
    net = network(NETWORKS[kind] if network_def is None or hostile else network_def)
    with torch.no_grad():
        for value in net.parameters():
            value += 0.1 * torch.randn_like(value)
        for module in net.modules():  # batch-norm statistics of z-scored tiles, as training leaves them
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = None
        net.train()
        for _ in range(2):
            roi = (inferer or {}).get("roi_size")
            net(torch.randn(2, net_in(net), *(roi if isinstance(roi, list) else [ROI.get(kind, 32)] * 3)))
    state = net.state_dict()
    last = [k for k, v in state.items() if v.ndim == 5][-1]  # the output convolution
    state[last] = state[last] * scale
    state[last.replace("weight", "bias")] = state.get(last.replace("weight", "bias"), torch.zeros(1)) * scale
    torch.save(state, root / "models" / "model.pt")
    config = {
        "imports": ["$import glob", "$import os"],
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "patch_size": [32, 32, 32],
        "network_def": network_def or NETWORKS[kind],
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing or PREPROCESSING},
        "inferer": inferer or {"_target_": "SlidingWindowInferer", "roi_size": [ROI.get(kind, 32)] * 3,
                               "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian",
                               "sw_device": "$torch.device('cpu')"},  # an expression nnslim never evaluates
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing or [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image"},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "$os.path.join('.', 'eval')"}]},
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=1))
    metadata = {"name": f"test_{kind}", "version": "0.1.0", "network_data_format": {
        "inputs": {"image": {"num_channels": 1, "spatial_shape": [32, 32, 32]}},
        "outputs": {"pred": {"num_channels": 3, "channel_def": {"0": "background", "1": "grey", "2": "white"}}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=1))
    return root
