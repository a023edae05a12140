"""MONAI bundles in: `nnslim build-engine BUNDLE_DIR` (`read_bundle`).

A bundle is a folder with `configs/metadata.json`, `configs/inference.json` (or `.yaml`) and
`models/model.pt`. What is read, and how it maps to an engine:

- The network: the config's `network_def`, built through MONAI's own config parser once nnslim has
  checked it (`checked_network`): its `_target_` must be a network class of `monai.networks.nets`,
  `@` references are resolved to the config's literal values, and a `$` expression is accepted only
  when it is a Python literal (`ast.literal_eval`: `$True`, `$[96, 96, 96]`). Nothing of the bundle
  runs as code: an expression, an import, a nested `_target_` or another class is refused.
- The weights: `models/model.pt` read with `torch.load(weights_only=True)` (a state dict, or one
  under "model" / "state_dict"), loaded into that network. A bundle with only `models/model.ts` is
  refused: `torch.jit.load` runs the TorchScript it holds (its `__setstate__` methods).
- Pre-processing (`preprocessing.transforms` on the image key; see `transforms`): loading and
  channel-first need nothing, `Orientation(d)` orients the voxel axes from the scan's affine,
  `Spacing(d)` resamples to `pixdim` (nnslim's trilinear rule, not MONAI's affine resampler),
  `ScaleIntensityRange(d)` and `NormalizeIntensity(d)` are MONAI's own arithmetic. Any other
  transform is refused, all of them listed.
- The inferer: `SlidingWindowInferer`'s `roi_size` (the engine's patch), `sw_batch_size` (the
  engine's batch), `overlap`, `mode`, `sigma_scale`, `padding_mode` ("constant") and `cval`,
  recorded as the engine's window rules (`runtime.window.rules`, "monai").
- Post-processing: `Activations(d)` softmax or sigmoid and `AsDiscrete(d)` argmax or threshold:
  argmax becomes the label map, sigmoid thresholding nnU-Net's region rule (channel i is label i + 1,
  later channels painted over earlier ones).
- Label names: `network_data_format.outputs.<key>.channel_def` of the metadata.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

from nnslim.compiler.runtime.window.blending import Blending
from nnslim.compiler.runtime.window.rules import WindowRules
from nnslim.compiler.stages.monai_transforms import intensity_entry, read_postprocessing, read_preprocessing
from nnslim.errors import NnslimError

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
MODEL_NAMES = ("model.pt",)
_REFUSED_KEYS = ("_requires_", "_mode_", "_disabled_")


class BundleError(NnslimError):
    """A MONAI bundle nnslim cannot read or reproduce; the message says what and why."""


def is_bundle(path: Path) -> bool:
    """A folder with MONAI's `configs/metadata.json` and an inference config."""
    return (path / "configs" / "metadata.json").is_file() and any((path / "configs" / n).is_file() for n in CONFIG_NAMES)


def read_config(path: Path) -> dict[str, Any]:
    """A JSON or YAML config as plain data (YAML through `yaml.safe_load`: no object tags)."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {path.name}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError and its kin
        raise BundleError(f"cannot read {path.name}: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path.name} holds a {type(data).__name__}; a MONAI config is a mapping")
    return data


MAX_NODES = 100_000  # values one resolution may produce (a config whose references double at each level stops here)
SPECIAL = ("$", "@", "%")  # what MONAI's parser would evaluate, look up or read: never left in a resolved value


def resolve(value: Any, config: dict[str, Any], where: str, depth: int = 0, budget: list[int] | None = None) -> Any:
    """`value` with `@` references replaced by the config's values and `$` literals evaluated; an
    expression that is not a literal, a reference loop or a result over `MAX_NODES` values is
    refused (`BundleError`)."""
    budget = [MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise BundleError(f"{where}: the config expands to more than {MAX_NODES} values (references that multiply)")
    if depth > 32:
        raise BundleError(f"{where}: references nest more than 32 deep (a loop?)")
    if isinstance(value, dict):
        for key in _REFUSED_KEYS:
            if key in value:
                raise BundleError(f"{where}: {key} is not supported (it runs or skips parts of the config)")
        if not all(isinstance(k, str) for k in value):
            raise BundleError(f"{where} has a key that is not a string")
        return {k: resolve(v, config, f"{where}.{k}", depth + 1, budget) for k, v in value.items() if k != "_desc_"}
    if isinstance(value, list):
        return [resolve(v, config, f"{where}[{i}]", depth + 1, budget) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    if value.startswith("@"):
        return resolve(_lookup(config, value[1:], where), config, value, depth + 1, budget)
    if value.startswith("%"):
        raise BundleError(f"{where}: the macro {value!r} reads another file; nnslim reads only this bundle's config")
    if value.startswith("$"):
        if len(value) > 10_000:
            raise BundleError(f"{where}: a $ value of {len(value)} characters; nnslim reads short literals only")
        try:
            literal = ast.literal_eval(value[1:].strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise BundleError(f"{where} is the expression {value[:80]!r}; nnslim runs no code from a bundle and accepts "
                              "only literal values there (write the value itself)") from None
        _check_plain(literal, where)
        return literal
    return value


def _check_plain(value: Any, where: str) -> None:
    """A resolved value holds nothing MONAI's parser would act on: no string (or key) starting with
    `$`, `@` or `%`, only JSON-like types (numbers, strings, lists, tuples, string-keyed dicts)."""
    stack: list[Any] = [value]
    seen = 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise BundleError(f"{where}: more than {MAX_NODES} values")
        if isinstance(item, str):
            if item.startswith(SPECIAL):
                raise BundleError(f"{where} resolves to {item[:60]!r}, which MONAI's parser would evaluate; refused")
        elif isinstance(item, dict):
            if not all(isinstance(k, str) and not k.startswith(SPECIAL) for k in item):
                raise BundleError(f"{where} has a key that is not a plain string")
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif not (item is None or isinstance(item, (bool, int, float))):
            raise BundleError(f"{where} holds a {type(item).__name__}; nnslim reads JSON-like values only")


def follow(value: Any, config: dict[str, Any], where: str) -> Any:
    """`value`, or what an `@` reference names (followed until it is not one)."""
    for _ in range(32):
        if not (isinstance(value, str) and value.startswith("@")):
            return value
        value = _lookup(config, value[1:], where)
    raise BundleError(f"{where}: references nest more than 32 deep (a loop?)")


def _lookup(config: dict[str, Any], ref: str, where: str) -> Any:
    node: Any = config
    for part in ref.replace("#", "::").split("::"):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise BundleError(f"{where}: the reference @{ref} names nothing in the config")
    return node


def network_class(target: Any, where: str) -> type:
    """The class a `_target_` names, when it is a network of `monai.networks.nets` (the allow-list)."""
    import monai.networks.nets as nets
    from torch import nn

    name = target.rsplit(".", 1)[-1] if isinstance(target, str) else None
    cls = getattr(nets, name, None) if name and not name.startswith("_") else None
    module_ok = isinstance(target, str) and (target == name or target.startswith("monai.networks.nets."))
    if not (module_ok and isinstance(cls, type) and issubclass(cls, nn.Module)
            and cls.__module__.startswith("monai.networks.nets")):
        raise BundleError(f"{where}._target_ is {target!r}; nnslim builds only MONAI's own networks "
                          "(a class of monai.networks.nets, e.g. UNet, SegResNet, SwinUNETR, DynUNet)")
    return cls


def checked_network(config: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The bundle's network, built through MONAI's `ConfigParser` from the checked `network_def`,
    and that definition as plain data (recorded in the manifest)."""
    from monai.bundle import ConfigParser

    if "network_def" not in config:
        raise BundleError("the inference config has no network_def (MONAI's key for the network's definition)")
    definition = resolve(config["network_def"], config, "network_def")
    if not isinstance(definition, dict) or "_target_" not in definition:
        raise BundleError("network_def must be a mapping with a _target_ (the network class)")
    cls = network_class(definition["_target_"], "network_def")
    _check_plain({k: v for k, v in definition.items() if k != "_target_"}, "network_def")
    for key, value in definition.items():
        if key != "_target_" and "_target_" in json.dumps(value, default=str):
            raise BundleError(f"network_def.{key} builds another object (a nested _target_); nnslim builds the network "
                              "class alone")
    definition = {**definition, "_target_": f"monai.networks.nets.{cls.__name__}"}
    try:
        network = ConfigParser({"network_def": definition}).get_parsed_content("network_def", instantiate=True)
    except Exception as exc:  # the network's own constructor: any error it raises on these arguments
        raise BundleError(f"MONAI could not build {cls.__name__} from network_def: {type(exc).__name__}: {exc}") from None
    return network, definition


def load_weights(network: Any, model_file: Path) -> None:
    """The bundle's weights into `network` (module docstring), strictly: every parameter, no other."""
    import torch

    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's unpickler refusing a payload, or a damaged file
        raise BundleError(f"cannot read the weights {model_file.name} (weights only): {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300]}") from None
    if isinstance(state, dict):
        for key in ("model", "state_dict", "network"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise BundleError(f"{model_file.name} holds a {type(state).__name__}, not a state dict of the network")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    missing, unexpected = _key_differences(network.state_dict(), state)
    if missing or unexpected:
        raise BundleError(f"{model_file.name} does not fit network_def: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                          f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # same names, other shapes
        raise BundleError(f"{model_file.name} does not fit network_def: {str(exc).splitlines()[-1][:300]}") from None


def _key_differences(expected: dict[str, Any], got: dict[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def window_rules(config: dict[str, Any]) -> tuple[WindowRules, tuple[int, ...] | None, int | None]:
    """The inferer as window rules, with its roi_size and sw_batch_size (None where not given)."""
    inferer = follow(config.get("inferer"), config, "inferer")
    if not isinstance(inferer, dict) or str(inferer.get("_target_", "")).rsplit(".", 1)[-1] != "SlidingWindowInferer":
        target = inferer.get("_target_") if isinstance(inferer, dict) else inferer
        raise BundleError(f"the inferer is {target!r}; nnslim reproduces MONAI's SlidingWindowInferer (a tiled "
                          "engine needs a window size)")
    read = ("roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode", "cval")
    inferer = resolve({k: inferer[k] for k in read if k in inferer}, config, "inferer")  # devices etc. never evaluated
    overlap = _one_value(inferer.get("overlap", 0.25), "inferer.overlap")
    sigma = _one_value(inferer.get("sigma_scale", 0.125), "inferer.sigma_scale")
    mode = str(inferer.get("mode", "constant"))
    padding = str(inferer.get("padding_mode", "constant"))
    cval = inferer.get("cval", 0.0)
    if not (isinstance(overlap, (int, float)) and 0 <= overlap < 1):
        raise BundleError(f"inferer.overlap is {overlap!r}; MONAI needs a number in [0, 1)")
    if mode not in ("constant", "gaussian"):
        raise BundleError(f"inferer.mode is {mode!r}; MONAI's modes are constant and gaussian")
    if padding != "constant":
        raise BundleError(f"inferer.padding_mode is {padding!r}; nnslim reproduces constant padding (with cval) only")
    if not (isinstance(sigma, (int, float)) and sigma > 0 and isinstance(cval, (int, float)) and math.isfinite(cval)):
        raise BundleError(f"inferer.sigma_scale {sigma!r} must be > 0 and inferer.cval {cval!r} a finite number")
    roi = inferer.get("roi_size")
    if roi is not None:
        roi = tuple(int(v) for v in (roi if isinstance(roi, list) else [roi] * 3))
        if len(roi) != 3 or min(roi) < 1:
            raise BundleError(f"inferer.roi_size is {inferer.get('roi_size')!r}; nnslim needs 3 positive sizes (a "
                              "3D network; -1, the whole axis, has no fixed engine shape)")
    batch = inferer.get("sw_batch_size")
    rules = WindowRules("monai", 1 - float(overlap), Blending(mode, float(sigma), rule="monai"), float(cval))
    return rules, roi, int(batch) if isinstance(batch, int) and batch >= 1 else None


def _one_value(value: Any, where: str) -> Any:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise BundleError(f"{where} is {list(value)}; nnslim reproduces one value for every axis")
        return value[0]
    return value


def label_names(metadata: dict[str, Any], num_classes: int) -> list[str]:
    """One name per output channel from the metadata's `channel_def` (`label_<i>` where it names none)."""
    names = (_first_entry(metadata, "outputs") or {}).get("channel_def") or {}
    return [str(names.get(str(i), names.get(i, f"label_{i}"))) if isinstance(names, dict) else f"label_{i}"
            for i in range(num_classes)]


def _first_entry(metadata: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The metadata's first `network_data_format.<kind>` entry ("inputs": the image, "outputs": the prediction)."""
    entries = (metadata.get("network_data_format") or {}).get(kind) or {}
    first = next(iter(entries.values()), None) if isinstance(entries, dict) else None
    return first if isinstance(first, dict) else None


def read_bundle(path: Path) -> Any:
    """A bundle folder as a `source.Source` (module docstring); a config of unexpected shape is a
    `BundleError` naming what went wrong, never a traceback."""
    try:
        return _read_bundle(path)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError, MemoryError) as exc:
        raise BundleError(f"{Path(path).name}: the bundle's config or metadata is not what MONAI writes "
                          f"({type(exc).__name__}: {str(exc)[:200]})") from None


def _read_bundle(path: Path) -> Any:
    from nnslim.compiler.stages.source import module_source
    from nnslim.extras import installed, missing_extra

    if not installed("monai"):
        raise missing_extra("monai")

    path = Path(path)
    config_file = next(path / "configs" / n for n in CONFIG_NAMES if (path / "configs" / n).is_file())
    model_file = next((path / "models" / n for n in MODEL_NAMES if (path / "models" / n).is_file()), None)
    if model_file is None:
        if (path / "models" / "model.ts").is_file():
            raise BundleError(f"{path.name} has only models/model.ts: loading TorchScript runs the code it holds, which "
                              "nnslim does not do for a model it did not write. Where you trust it, save its weights: "
                              "torch.save(torch.jit.load('model.ts').state_dict(), 'models/model.pt')")
        raise BundleError(f"{path.name} has no models/model.pt (the bundle's weights)")
    config, metadata = read_config(config_file), read_config(path / "configs" / "metadata.json")
    network, definition = checked_network(config)
    load_weights(network, model_file)
    rules, roi, batch = window_rules(config)
    pre = read_preprocessing(config)
    first, output = _first_entry(metadata, "inputs") or {}, _first_entry(metadata, "outputs") or {}
    roi = roi or tuple(int(v) for v in first.get("spatial_shape") or ())
    if len(roi) != 3:
        raise BundleError("neither inferer.roi_size nor the metadata's input spatial_shape gives a 3D window size")
    in_channels = int(definition.get("in_channels", first.get("num_channels", 1)))
    classes = int(definition.get("out_channels", output.get("num_channels", 0)))
    post = read_postprocessing(config, classes)
    source = module_source(network, {
        "patch_size": roi, "label_names": label_names(metadata, classes), "in_channels": in_channels,
        "normalization": intensity_entry(pre, in_channels), "spacing": pre.get("pixdim"),
        "dataset": {"name": metadata.get("name") or path.name, "version": metadata.get("version")}})
    source.kind, source.files = "monai-bundle", [config_file, path / "configs" / "metadata.json", model_file]
    source.architecture = {"name": "monai-bundle", "class": definition["_target_"], "config": definition}
    source.preprocessing = {**source.preprocessing, "orientation": pre.get("axcodes"), "window": rules.to_record(),
                            "transforms": pre["names"]}
    source.postprocessing = post
    source.details = {**source.details, "bundle": metadata.get("name") or path.name,
                      "bundle_version": metadata.get("version"), "sw_batch_size": batch}
    return source
