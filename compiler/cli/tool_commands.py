"""Commands around engines and experiments: inspect, export-triton, serve, report, bench, prune-sweep."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nnslim.compiler.cli.options import (
    TableChoice,
    float_list,
    out_dir_option,
    patch_option,
    patch_tuple,
    path_type,
    progress_option,
    skip_modes,
)


@click.command(epilog="""\b
Examples:
  nnslim inspect artifacts/engines/mni-tissue-tiny
  nnslim inspect artifacts/engines/mni-tissue-tiny/model.onnx
""")
@click.argument("target", type=path_type())
def inspect(target) -> None:
    """Op histogram, parameters, MACs, dtypes, sparsity and TensorRT compatibility of an ONNX model
    or an engine directory (plus its manifest summary)."""
    from nnslim.compiler.stages.inspect_model import format_summary, inspect_path

    click.echo(format_summary(inspect_path(target)))


@click.command("export-triton", epilog="""\b
Examples:
  nnslim export-triton artifacts/engines/tiny model_repository
  nnslim export-triton engines/liver /models --name liver_ct --instances 2
  nnslim export-triton engines/liver-v2 /models --name liver_ct --version-policy latest:2
  nnslim export-triton engines/liver /models --whole-volume --name liver_volumes
""")
@click.argument("engine_dir", type=path_type(file_okay=False))
@click.argument("repository", type=path_type(exists=False, file_okay=False))
@click.option("--name", default=None, help="Model name in the repository [default: the engine directory's name; "
              "with --whole-volume, nnslim]. An existing model of that name gets the next version folder (same "
              "inputs and outputs only).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1),
              help="Model instances (per GPU for KIND_GPU).")
@click.option("--kind", type=click.Choice(["KIND_CPU", "KIND_GPU"]), default=None,
              help="Instance kind [default: from the engine's device: KIND_CPU for onnxruntime and openvino, "
                   "KIND_GPU for tensorrt and onnxruntime-cuda].")
@click.option("--version-policy", default=None, metavar="POLICY",
              help="Triton's version_policy: latest:N, all, or specific:1,3 [default: kept from an existing "
                   "config, else Triton's latest:1].")
@click.option("--whole-volume", is_flag=True,
              help="Write a Python-backend model that segments whole volumes inside Triton with nnslim's runtime "
                   "(IMAGE [C,X,Y,Z] fp32 + SPACING [3] fp32 in, LABELS uint8 and optional PROBABILITIES fp16 out) "
                   "instead of the network alone. Triton's Python must have nnslim installed (nnslim serve does "
                   "this for you).")
def export_triton(engine_dir, repository, name, instances, kind, version_policy, whole_volume) -> None:
    """Write a Triton Inference Server model repository entry from an engine directory: config.pbtxt
    (Triton's schema: dynamic batching, the instance kind of the engine's device, warmup, the chosen
    backend and precision) and a version folder with the plan or ONNX model the engine runs, or with
    --whole-volume, the model that segments whole volumes."""
    from nnslim.compiler.deploy.triton import export_triton as run_export

    done = run_export(engine_dir, repository, name, instances, kind, version_policy, whole_volume=whole_volume)
    click.echo(f"Triton model written to {done.model_dir} (config.pbtxt, version {done.version}: "
               f"{done.version}/{done.model_file})")


@click.command("serve", epilog="""\b
Examples:
  nnslim serve artifacts/engines/tiny
  nnslim serve engines/liver --http-port 9000 --grpc-port 9001 --metrics-port 9002 --instances 2
  nnslim serve engines/liver --host 0.0.0.0 --instances 2

\b
--host 0.0.0.0 makes it reachable from other machines: Triton has no TLS or authentication here.

\b
A client (pip install 'tritonclient[http]'), with the volume as nibabel gives it:
  import nibabel as nib, numpy as np, tritonclient.http as http
  scan = nib.load("scan.nii.gz")
  image = np.asarray(scan.dataobj, dtype=np.float32)[None]      # [C, X, Y, Z]
  spacing = np.asarray(scan.header.get_zooms()[:3], dtype=np.float32)
  inputs = [http.InferInput("IMAGE", image.shape, "FP32"), http.InferInput("SPACING", [3], "FP32")]
  inputs[0].set_data_from_numpy(image); inputs[1].set_data_from_numpy(spacing)
  client = http.InferenceServerClient("127.0.0.1:8000")
  result = client.infer("nnslim", inputs, outputs=[http.InferRequestedOutput("LABELS")])
  labels = result.as_numpy("LABELS")                              # uint8 [X, Y, Z]
""")
@click.argument("engine_dir", type=path_type(file_okay=False))
@click.option("--name", default="nnslim", show_default=True, help="The model's name in Triton.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address Triton listens on (HTTP, gRPC and metrics); 0.0.0.0 for every interface.")
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535))
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Model instances: volumes segmented at once (each holds the engine).")
@click.option("--threads", default=None, type=click.IntRange(0, 1024),
              help="CPU threads per instance [default: one instance uses every core; several share them out].")
@click.option("--memory-budget-mb", default=None, type=click.FloatRange(64, 2**30),
              help="Memory each instance may plan a request for; a volume whose segmentation needs more gets an "
                   "error response [default: the memory available at start, shared out among the instances].")
@click.option("--startup-timeout", default=300.0, show_default=True, type=click.FloatRange(1),
              help="Seconds to wait for the model to be READY.")
@click.option("--triton-log", type=click.Choice(["warnings", "all", "quiet"]), default="warnings", show_default=True,
              help="Which of Triton's log lines to pass on (to stderr).")
def serve(engine_dir, name, host, http_port, grpc_port, metrics_port, instances, threads, memory_budget_mb,
          startup_timeout, triton_log) -> None:
    """Serve an engine with a real Triton Inference Server: whole volumes in, labels out (the
    export-triton --whole-volume model), over HTTP and gRPC. Runs in the foreground, prints one
    READY line when the model can be called, and stops on Ctrl-C or SIGTERM. Needs the serve extra
    (pip install 'nnslim[serve]': Triton's CPU-capable tritonserver, from the nvidia-pytriton wheel)."""
    from nnslim.compiler.deploy.serve import ServeSettings
    from nnslim.compiler.deploy.serve import serve as run_serve

    settings = ServeSettings(engine_dir=engine_dir, name=name, host=host, http_port=http_port, grpc_port=grpc_port,
                             metrics_port=metrics_port, instances=instances, threads=threads,
                             memory_budget_mb=memory_budget_mb, startup_seconds=startup_timeout, log=triton_log)

    def ready(s: ServeSettings) -> None:
        urls = s.urls()
        click.echo(f"READY model {s.name!r} at {urls['http']} (HTTP), {urls['grpc']} (gRPC), {urls['metrics']} "
                   "(metrics); Ctrl-C or SIGTERM stops", nl=True)
        sys.stdout.flush()

    run_serve(settings, ready, echo=lambda line: click.echo(line, err=True))
    click.echo("stopped", err=True)


@click.command("report", epilog="""\b
Examples:
  nnslim report segs/
""")
@click.argument("output", type=path_type(file_okay=False))
def report(output) -> None:
    """Merge the parts of a folder written by `nnslim infer --num-parts N` (an array job): one
    previews/index.html listing every case once, and OUTPUT/nnslim-summary.json with every run record,
    the cases written, the failures of each part's last run and the engines that wrote it."""
    from nnslim.compiler.runtime.cases.report import merge

    done = merge(output)
    index = f", {done.index}" if done.index else ""
    click.echo(f"{done.summary}{index}: {done.runs} run record(s), {done.cases} case(s) written")


@click.command(epilog="""\b
Examples:
  nnslim bench artifacts/models/mni-tissue-tiny.pt artifacts/data/mni-tissue/imagesTr/mni_0000.nii.gz \\
      --out artifacts/bench/headline/mni-tissue-tiny --patch 96 96 96
  nnslim bench model.pt scan.nii.gz --out bench/ --batch 4 --repeats 5 --prune-sparsity 0.8
""")
@click.argument("checkpoint", type=path_type(dir_okay=False))
@click.argument("volume", type=path_type(dir_okay=False))
@out_dir_option()
@patch_option("Tile size (default: training patch).")
@click.option("--batch", "batch_size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="Runs per row (median).")
@click.option("--prune-sparsity", default=0.5, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--structured-ratio", default=0.25, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--skip", type=TableChoice(lambda: [m for m in skip_modes() if m != "none"]), default="mask",
              show_default=True, help="The window-skipping row's mode.")
def bench(checkpoint, out_dir, volume, patch, batch_size, repeats, prune_sparsity, structured_ratio, skip) -> None:
    """The usual way (PyTorch eager, batch 1) against nnslim stage by stage on one volume, in one run:
    seconds, speed-up, MACs and GFLOP/s against the machine's convolution peak, sizes, memory, and
    agreement; writes OUT/report.md, plots and bench.json."""
    from nnslim.compiler.workflows.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(
        checkpoint=checkpoint, volume=volume, out_dir=out_dir, patch_size=patch_tuple(patch),
        batch_size=batch_size, repeats=repeats, prune_sparsity=prune_sparsity, structured_ratio=structured_ratio,
        skip=skip,
    ), log=lambda m: click.echo(m, err=True))
    click.echo((Path(out_dir) / "report.md").read_text())
    click.echo(f"written {out_dir}/report.md, bench.json and plots ({len(result['rows'])} rows)")


@click.command("prune-sweep", epilog="""\b
Examples:
  nnslim prune-sweep artifacts/models/mni-tissue-tiny.pt \\
      --volume artifacts/data/mni-tissue/imagesTr/mni_0000.nii.gz \\
      --labels artifacts/data/mni-tissue/labelsTr/mni.nii.gz --out artifacts/prune-sweep/tiny
  nnslim prune-sweep model.pt --volume scan.nii.gz --thresholds 0.01,0.02,0.05 --out artifacts/sweep
""")
@click.argument("checkpoint", type=path_type(dir_okay=False))
@click.option("--volume", required=True, type=path_type(dir_okay=False), help="Volume to segment at every level.")
@click.option("--labels", type=path_type(dir_okay=False), default=None, help="Reference labels, for true Dice.")
@click.option("--mask", type=path_type(dir_okay=False), default=None, help="Score only where this volume is nonzero.")
@click.option("--sparsities", callback=float_list, default=None,
              help="Comma-separated target sparsities [default: 0,0.5,0.7,0.8,0.85,0.9,0.95].")
@click.option("--thresholds", callback=float_list, default=None, help="Comma-separated magnitude thresholds instead.")
@click.option("--min-proxy-dice", default=0.95, show_default=True, type=click.FloatRange(0, 1))
@out_dir_option("Writes sweep.json, sweep.png.")
@progress_option
def prune_sweep(checkpoint, volume, labels, mask, sparsities, thresholds, min_proxy_dice, out_dir, progress) -> None:
    """Global magnitude pruning at several levels without retraining (seed 001): proxy Dice of
    pruned vs unpruned segmentations, true Dice, and the largest sparsity at proxy Dice >= 0.95."""
    from nnslim.compiler.workflows.prune_sweep import DEFAULT_SPARSITIES, SweepConfig, run_sweep

    if sparsities is not None and thresholds is not None:
        raise click.UsageError("--sparsities and --thresholds are alternatives; give one")
    config = SweepConfig(
        checkpoint=checkpoint, volume=volume, labels=labels, mask=mask, out_dir=out_dir,
        sparsities=None if thresholds is not None else (sparsities or DEFAULT_SPARSITIES),
        thresholds=thresholds, min_proxy_dice=min_proxy_dice, progress=progress,
    )
    for line in sweep_lines(run_sweep(config), min_proxy_dice, with_labels=labels is not None):
        click.echo(line)
    click.echo(f"written: {out_dir / 'sweep.json'}, {out_dir / 'sweep.png'}")


def sweep_lines(result: dict, min_proxy_dice: float, with_labels: bool) -> list[str]:
    """prune-sweep's table: one row per level, the best level, and its layers."""
    lines = [f"{'sparsity':>9} {'threshold':>10} {'proxy Dice':>11}" + (f" {'true Dice':>10}" if with_labels else "")]
    for row in result["levels"]:
        line = f"{row['sparsity']:>9.3f} {row['threshold']:>10.3g} {row['proxy_mean_dice']:>11.4f}"
        lines.append(line + (f" {row['true_mean_dice']:>10.4f}" if with_labels else ""))
    best = result["largest_sparsity_at_min_proxy_dice"]
    lines.append(f"largest sparsity at proxy Dice >= {min_proxy_dice}: " + (f"{best:.1%}" if best is not None else "none"))
    if result["best_level"]:
        lines.append("sparsity by region: " + ", ".join(
            f"{k} {v:.1%}" for k, v in result["best_level"]["region_sparsity"].items()))
        lines.append(f"{'layer':<36} {'region':<10} {'weights':>9} {'sparsity':>9} {'mean |w|':>9}")
        for layer in result["layers_at_best_level"]:
            lines.append(f"{layer['name']:<36} {layer['region']:<10} {layer['parameters']:>9,} "
                         f"{layer['sparsity']:>9.1%} {layer['mean_abs_unpruned']:>9.4f}")
    return lines
