"""int8 as a graph stage: post-training static quantization into explicit Q/DQ form.

For a tensor x with scale s (zero point 0, symmetric int8):

    q = clamp(round(x / s), -128, 127),    x' = s * q,    s = range / 127

where `range` comes from calibration: the largest |x| (MinMax), a percentile of |x| (Percentile),
or the threshold that minimizes the KL divergence between the float and quantized histograms
(Entropy). Weights get one scale per output channel (axis 0 of a Conv weight, axis 1 of a
ConvTranspose weight, whose layout is `[C_in, C_out, ...]`); activations one scale per tensor.
For a TensorRT build (`tensorrt=True`) ConvTranspose weights are scaled on axis 0 instead, the axis
TensorRT's deconvolution kernels take, and only the quantized convs read dequantized tensors (see
`nnslim.compiler.stages.passes.tensorrt_support.tensorrt_qdq_issues`).

Only Conv and ConvTranspose are quantized, so InstanceNormalization, the nonlinearities, Softmax
and the graph's input and output stay float; biases stay float too (TensorRT fuses float biases;
OpenVINO and ONNX Runtime accept either). This is the one int8 form TensorRT 10/11 (explicit
quantization), OpenVINO and ONNX Runtime all run.

Activations are signed int8 with zero point 0 by default. On x86 CPUs without VNNI, OpenVINO's
int8 kernels (u8 x s8 multiply-adds with int16 intermediates) lose accuracy on signed
activations: on the demo model 0.947 argmax agreement where ONNX Runtime runs the same graph at
0.990, while unsigned asymmetric activations give 0.993 in both (measured on an AVX2 EPYC). For
CPU-only engines on such CPUs the recipes therefore also try `activations="uint8"`; those graphs
are marked as not TensorRT-ready (TensorRT takes symmetric int8 only).

Which layers to leave in float, and which calibration method, is decided by measurement: every
recipe is calibrated on the calibration tiles and scored by argmax agreement with PyTorch fp32 on
separate evaluation tiles, run by the backend that will execute the engine. Thin layers
(few channels: the full-resolution stage) gain little from int8 and lose the most accuracy, so
the recipes differ mainly in how many of them they keep in float.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

from nnslim.compiler.runtime.backends import OpenRequest, get_backend
from nnslim.compiler.runtime.backends import open_predictor as open_on_backend
from nnslim.compiler.runtime.backends.openvino_cpu import cpu_has_vnni
from nnslim.compiler.stages.engine_manifest import shipped_name
from nnslim.compiler.stages.graphs import GraphJob
from nnslim.compiler.stages.parity import parity_crops, run_batched
from nnslim.errors import NnslimError

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "ConvTranspose")
METHODS = ("minmax", "percentile", "entropy")
ACTIVATIONS = ("int8", "uint8")


class QuantizationError(NnslimError):
    """The graph could not be quantized, or no recipe reached the int8 gate."""


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize: the calibration method and which convs stay in float.

    Attributes:
        method: "minmax", "percentile" (99.999th percentile of |x|) or "entropy".
        activations: "int8" (symmetric, zero point 0: every backend) or "uint8" (asymmetric: CPU
            backends only, for CPUs without VNNI).
        min_channels: convs with fewer input or output channels than this stay in float.
        keep_ends: the first conv (reads the image) and the last (writes the logits) stay in float.
    """

    method: str = "minmax"
    min_channels: int = 0
    keep_ends: bool = True
    activations: str = "int8"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"unknown calibration method {self.method!r}; choose one of {METHODS}")
        if self.activations not in ACTIVATIONS:
            raise QuantizationError(f"unknown activation type {self.activations!r}; choose one of {ACTIVATIONS}")

    @property
    def tensorrt_ready(self) -> bool:
        return self.activations == "int8"

    @property
    def name(self) -> str:
        return (f"{self.method}, {self.activations} activations, float below {self.min_channels} channels"
                f"{', float ends' if self.keep_ends else ''}")


# Tried in this order; the best by measured agreement wins (ties: the earlier, i.e. more int8).
DEFAULT_RECIPES = (
    QuantRecipe("minmax", 0, True),
    QuantRecipe("percentile", 0, True),
    QuantRecipe("entropy", 0, True),
    QuantRecipe("minmax", 16, True),
)
# Tried in addition for CPU-only engines on CPUs without VNNI (see the module docstring).
UINT8_RECIPES = (
    QuantRecipe("minmax", 0, True, "uint8"),
    QuantRecipe("minmax", 16, True, "uint8"),
)


@dataclass(frozen=True)
class ConvLayer:
    name: str
    op_type: str
    in_channels: int
    out_channels: int


def conv_layers(model: onnx.ModelProto) -> list[ConvLayer]:
    """The graph's Conv / ConvTranspose nodes in graph order, with channel counts from their weights."""
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS or node.input[1] not in weights:
            continue
        shape = weights[node.input[1]]
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv":
            out_channels, in_channels = shape[0], shape[1] * groups
        else:  # ConvTranspose weights are [C_in, C_out / group, ...]
            in_channels, out_channels = shape[0], shape[1] * groups
        layers.append(ConvLayer(node.name, node.op_type, in_channels, out_channels))
    return layers


def float_layers(layers: list[ConvLayer], recipe: QuantRecipe) -> list[str]:
    """Names of the convs `recipe` keeps in float."""
    keep = {layer.name for layer in layers if min(layer.in_channels, layer.out_channels) < recipe.min_channels}
    if recipe.keep_ends and layers:
        keep |= {layers[0].name, layers[-1].name}
    return [layer.name for layer in layers if layer.name in keep]


class _TileReader:
    """ONNX Runtime's calibration data reader protocol over `[N, C, *patch]` tiles, one tile a step."""

    def __init__(self, input_name: str, tiles: np.ndarray) -> None:
        self.input_name, self.tiles, self.index = input_name, tiles, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.tiles):
            return None
        self.index += 1
        return {self.input_name: np.ascontiguousarray(self.tiles[self.index - 1 : self.index], dtype=np.float32)}

    def rewind(self) -> None:
        self.index = 0


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name (the quantizer excludes layers by node name)."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type.lower()}_{index}"
        seen.add(node.name)
    return model


def calibration_bytes_per_tile(model: onnx.ModelProto, tile_shape: tuple[int, ...]) -> int:
    """Bytes ONNX Runtime's calibrator keeps per tile: every conv's float input, which it records
    for every tile before computing ranges (its own per-batch merge option drops data in the
    installed version). Shapes come from shape inference with the batch set to 1."""
    from onnx import shape_inference

    static = onnx.ModelProto()
    static.CopyFrom(model)
    del static.graph.value_info[:]
    dims = static.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, (1, *tile_shape)):
        dim.Clear()
        dim.dim_value = int(size)
    inferred = shape_inference.infer_shapes(static)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input)}
    inputs = {node.input[0] for node in inferred.graph.node if node.op_type in QUANTIZED_OPS}
    return sum(4 * int(np.prod(shapes[name])) for name in inputs if name in shapes and all(shapes[name]))


def calibration_tiles_that_fit(fp32_path: Path, tile_shape: tuple[int, ...], requested: int,
                               budget_fraction: float = 0.3) -> int:
    """How many of `requested` calibration tiles fit in `budget_fraction` of this machine's memory."""
    from nnslim.compiler.runtime.safety import machine_memory_bytes

    # measured: the calibration session's own working memory is about as large again
    per_tile = 2 * calibration_bytes_per_tile(onnx.load(str(fp32_path)), tile_shape)
    memory = _available_memory_bytes() or machine_memory_bytes()
    if not memory or not per_tile:
        return requested
    fits = max(1, int(budget_fraction * memory // per_tile))
    if fits < requested:
        logger.warning("int8 calibration needs about %.1f GB per %s tile; calibrating on %d of %d tiles to stay "
                       "within %.0f%% of the %.1f GB available", per_tile / 1e9, "x".join(map(str, tile_shape[1:])),
                       fits, requested, 100 * budget_fraction, memory / 1e9)
    return min(requested, fits)


def _available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux): what this build can use without pushing others out."""
    try:
        with open("/proc/meminfo") as info:
            line = next((ln for ln in info if ln.startswith("MemAvailable:")), None)
    except OSError:
        return None
    return int(line.split()[1]) * 1024 if line else None


@contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs advice ("consider pre-processing") on the root logger at WARNING
    for every call; nnslim's own log says what was quantized and how."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(fp32_path: Path, out_path: Path, calibration_tiles: np.ndarray, recipe: QuantRecipe,
                  input_name: str = "image", cache_dir: Path | None = None, tensorrt: bool = False) -> list[str]:
    """Write the Q/DQ int8 graph of `fp32_path` to `out_path`; returns the names of the convs kept in float.

    Args:
        tensorrt: make the form TensorRT's explicit quantization takes (`passes.tensorrt_support`):
            weight scales on the axes its kernels use (`TENSORRT_WEIGHT_AXES`; ONNX Runtime's default
            for ConvTranspose differs), and Q/DQ on the inputs of the quantized convs only.
        cache_dir: where to keep the calibrated tensor ranges, one file per (method, activation
            type), so recipes that differ only in which layers stay in float calibrate once. The
            first recipe of a method must keep the fewest layers in float (it calibrates the most tensors).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from nnslim.compiler.stages.passes.tensorrt_support import TENSORRT_WEIGHT_AXES

    model = _named(onnx.load(str(fp32_path)))
    weight_axes = TENSORRT_WEIGHT_AXES if tensorrt else {}
    layers = conv_layers(model)
    if not layers:
        raise QuantizationError(f"{fp32_path} has no Conv/ConvTranspose layers to quantize")
    keep = float_layers(layers, recipe)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[recipe.method]
    signed = recipe.activations == "int8"
    extra = {
        "ActivationSymmetric": signed,  # zero point 0 for signed activations
        "WeightSymmetric": True,
        "QuantizeBias": False,  # float biases: what TensorRT's explicit quantization fuses
        # Q/DQ on the inputs of a conv only (data and weights), not on its output: the output feeds a
        # float InstanceNorm, and TensorRT / OpenVINO place int8 at the inputs of quantizable ops
        "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
        "CalibPercentile": 99.999,
        "CalibTensorRangeSymmetric": signed,
        # the per-channel axis of a weight, where the caller's backend needs another than ONNX Runtime's
        # default (its per-op-type option does not reach Conv / ConvTranspose, a per-tensor override does)
        "TensorQuantOverrides": {node.input[1]: [{"axis": weight_axes[node.op_type]}] for node in model.graph.node
                                 if node.op_type in weight_axes and node.name not in keep},
        # ONNX Runtime widens weight scales so that an int32 bias would be representable, assuming one weight
        # scale per output channel; biases stay float here, and with ConvTranspose scales per input channel
        # that assumption indexes past the bias
        "QDQDisableWeightAdjustForInt32Bias": bool(weight_axes),
    }
    with tempfile.TemporaryDirectory(prefix="nnslim-quant-") as scratch:
        named = Path(scratch) / "named.onnx"
        onnx.save(model, str(named))
        with _quiet_root_logger():
            quantize_static(
                str(named), str(out_path), _TileReader(input_name, calibration_tiles),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                activation_type=QuantType.QInt8 if signed else QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=keep, calibrate_method=method, extra_options=extra,
                calibration_cache_path=cache_dir / f"ranges-{recipe.method}-{recipe.activations}.json" if cache_dir else None,
            )
    if tensorrt:
        quantized = onnx.load(str(out_path))
        if _float_into_unquantized_consumers(quantized, set(keep)):
            onnx.save(quantized, str(out_path))
    return keep


def _float_into_unquantized_consumers(model: onnx.ModelProto, float_convs: set[str]) -> int:
    """Give every op that is not a quantized conv the float tensor instead of its dequantized copy.

    ONNX Runtime rewires every reader of a quantized activation to the DequantizeLinear, so a skip
    connection's Concat (or a conv kept in float) would read the int8-rounded copy only the conv
    needs; TensorRT would have to run that DequantizeLinear on its own. Returns the inputs rewired.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    float_of = {}
    for node in model.graph.node:
        quantize = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            float_of[node.output[0]] = quantize.input[0]
    rewired = 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or (
                node.op_type in QUANTIZED_OPS and node.name not in float_convs):
            continue
        for index, tensor in enumerate(node.input):
            if tensor in float_of:
                node.input[index] = float_of[tensor]
                rewired += 1
    return rewired


@dataclass(frozen=True)
class RecipeScore:
    recipe: QuantRecipe
    float_layers: list[str]
    agreement: float
    max_rel_logit_error: float

    def to_dict(self) -> dict:
        return {"recipe": asdict(self.recipe), "name": self.recipe.name, "float_layers": self.float_layers,
                "agreement": self.agreement, "max_rel_logit_error": self.max_rel_logit_error}


def choose_recipe(fp32_path: Path, out_path: Path, calibration_tiles: np.ndarray, evaluation_tiles: torch.Tensor,
                  reference_logits: torch.Tensor, open_predictor: Callable[[Path], Callable[[torch.Tensor], torch.Tensor]],
                  recipes: tuple[QuantRecipe, ...] = DEFAULT_RECIPES, batch_size: int = 2,
                  tensorrt: bool = False) -> list[RecipeScore]:
    """Quantize with every recipe, score each on the evaluation tiles, leave the best at `out_path`.

    Args:
        open_predictor: opens an int8 graph with the backend that will run it (OpenVINO or ONNX
            Runtime), so the score is what that backend computes.
        reference_logits: PyTorch fp32 logits of `evaluation_tiles`.
        tensorrt: quantize into the form TensorRT takes (see `quantize_int8`).

    Returns:
        Every recipe's score, best first.
    """
    scores: list[tuple[RecipeScore, Path]] = []
    scratch = Path(tempfile.mkdtemp(prefix="nnslim-int8-", dir=out_path.parent))
    try:
        for index, recipe in enumerate(recipes):
            candidate = scratch / f"recipe{index}.onnx"
            keep = quantize_int8(fp32_path, candidate, calibration_tiles, recipe, cache_dir=scratch,
                                 tensorrt=tensorrt)
            predict = open_predictor(candidate)
            logits = run_batched(predict, evaluation_tiles, batch_size)
            agreement = float((logits.argmax(1) == reference_logits.argmax(1)).double().mean())
            error = float((logits - reference_logits).abs().max() / reference_logits.abs().max().clamp_min(1e-12))
            scores.append((RecipeScore(recipe, keep, agreement, error), candidate))
            logger.info("int8 recipe %s: agreement %.5f, max rel logit error %.3g", recipe.name, agreement, error)
        ranked = sorted(scores, key=lambda item: -item[0].agreement)  # stable: earlier recipes win ties
        ranked[0][1].replace(out_path)
        return [score for score, _ in ranked]
    finally:
        for leftover in scratch.glob("*"):
            leftover.unlink()
        scratch.rmdir()


def int8_graph(job: GraphJob) -> tuple[Path, dict[str, Any]]:
    """The int8 precision's producer (`stages.graphs`): `model.int8.onnx`, its recipe chosen by
    agreement as the backend that runs it computes (OpenVINO's int8 kernels differ from ONNX
    Runtime's); for a compiled artifact (TensorRT), the symmetric recipes in TensorRT's form."""
    volumes = job.calibration
    if not volumes:
        raise QuantizationError("an int8 graph needs real calibration tiles: give --parity-volume or --calibration")
    tile = (job.in_channels, *job.patch)
    per_volume = max(1, calibration_tiles_that_fit(job.fp32, tile, job.calibration_tiles * len(volumes)) // len(volumes))
    calibration = torch.cat([parity_crops(job.patch, job.in_channels, per_volume, volume, job.preprocessing,
                                          seed=1 + i)[0] for i, volume in enumerate(volumes)])
    backend = "openvino" if "openvino" in job.backends else job.backends[0]
    recipes = DEFAULT_RECIPES
    if job.compiled_for is None and get_backend(backend).device == "cpu" and not cpu_has_vnni():
        recipes = (*DEFAULT_RECIPES, *UINT8_RECIPES)  # no int8 dot-product instruction: unsigned activations
    out = job.staging / "model.int8.onnx"
    scores = choose_recipe(job.fp32, out, calibration.numpy(), job.tiles, job.expected,
                           lambda path: open_on_backend(backend, OpenRequest(path, precision="int8")), recipes,
                           job.batch_size, tensorrt=job.compiled_for is not None)
    return out, {"calibration": [shipped_name(v) for v in volumes], "recipes": [s.to_dict() for s in scores]}
