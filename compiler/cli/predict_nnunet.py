"""`nnslim-predict-nnunet`: nnU-Net v2's `nnUNetv2_predict`, with its arguments, its output folder and
its numbers, on an nnslim engine.

    nnUNetv2_predict       -i imagesTs -o predictions -d 3 -c 3d_fullres
    nnslim-predict-nnunet  -i imagesTs -o predictions -d 3 -c 3d_fullres

The arguments are nnU-Net's (argparse, single-dash long flags). The model folder is found as nnU-Net
finds it: `$nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION`, `-d` a dataset id or name.
The first run builds an engine for this machine (the fastest candidate inside its gate, as
`build-engine --precision auto` does) into nnslim's engine cache, keyed by the model files' sha256,
folds, checkpoint, machine and nnslim version (`stages.engine_cache`); later runs reuse it. Then the
folder is segmented and written as nnU-Net writes it: segmentations in the dataset's file ending with
the input's geometry, `dataset.json`, `plans.json`, `predict_from_raw_data_args.json`, and with
`--save_probabilities` nnU-Net's `.npz` and `.pkl` (`runtime.nnunet.files`).

nnslim's own options: `--precision` (default auto; fp32 for the closest agreement with nnU-Net)
and `-pp_pkl_file` (nnU-Net's postprocessing.pkl, applied to the segmentations as
`nnUNetv2_apply_postprocessing` applies it: `runtime.nnunet.postprocessing`).

Differences, stated: `-f` defaults to every `fold_N` the model folder has (nnU-Net: 0 1 2 3 4,
an error when one is missing), printed; the window accumulates in fp32 where nnU-Net's predictor
accumulates in fp16 (at a volume's edges and corners, where every window's Gaussian weight is
below fp16's normal range, nnU-Net's logits are rounding noise; nnslim's are not); `-npp` / `-nps` size nnslim's I/O threads (at most 8);
`-device cuda` on a machine without a usable GPU runs on the CPU with a warning.

Cascades: `-c 3d_cascade_fullres` with `-prev_stage_predictions FOLDER` reads the previous stage's
segmentations there, as nnU-Net does. Without it (nnU-Net refuses), nnslim chains the two stages
itself: the previous stage (`3d_lowres`, same trainer, plans, folds and checkpoint) segments the
cases into a temporary folder inside the output folder, which is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import click

from nnslim.errors import EngineError, InputError, SettingsError

logger = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    """`nnUNetv2_predict`'s arguments (nnU-Net v2.8), with nnslim's help."""
    p = argparse.ArgumentParser(
        prog="nnslim-predict-nnunet", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="nnUNetv2_predict on an nnslim engine: the same arguments, output folder and numbers, faster.",
        epilog="examples:\n"
               "  nnslim-predict-nnunet -i imagesTs -o predictions -d 3 -c 3d_fullres\n"
               "  nnslim-predict-nnunet -i imagesTs -o predictions -d Dataset003_Liver -c 3d_fullres -f 0 1 "
               "--save_probabilities\n"
               "  nnslim-predict-nnunet -i imagesTs -o predictions -d 3 -c 2d -chk checkpoint_best.pth --disable_tta\n"
               "The engine is cached under $NNSLIM_CACHE/engines (default ~/.cache/nnslim/engines).")
    p.add_argument("-i", required=True, help="input folder (nnU-Net's channel files CASE_0000.nii.gz, ...)")
    p.add_argument("-o", required=True, help="output folder (created if missing)")
    p.add_argument("-d", required=True, help="dataset id or name (3, 003 or Dataset003_Liver)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer class (default: nnUNetTrainer)")
    p.add_argument("-c", required=True, nargs="+",
                   help="configuration (2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres); nnslim's own: several "
                        "configurations are ensembled as nnUNetv2_ensemble would")
    p.add_argument("-f", nargs="+", default=None, help="folds (default: every fold_N of the model folder)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--verbose", action="store_true", help="log what is done")
    p.add_argument("--save_probabilities", action="store_true", help="also write nnU-Net's CASE.npz and CASE.pkl")
    p.add_argument("--continue_prediction", "--c", action="store_true", help="skip cases whose output exists")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    p.add_argument("-npp", type=int, default=_environment_int("nnUNet_npp"), help="preprocessing workers")
    p.add_argument("-nps", type=int, default=_environment_int("nnUNet_nps"), help="export workers")
    p.add_argument("-prev_stage_predictions", default=None,
                   help="cascades: the previous stage's segmentations (default: nnslim runs that stage first)")
    p.add_argument("-num_parts", type=int, default=1, help="split the cases into this many parts")
    p.add_argument("-part_id", type=int, default=0, help="which part this run segments (0 .. num_parts - 1)")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="cuda (default) or cpu")
    p.add_argument("--disable_progress_bar", action="store_true", help="no progress bars")
    p.add_argument("--not_on_device", action="store_true", help="accepted for compatibility; nnslim decides itself")
    p.add_argument("-pp_pkl_file", default=None,
                   help="nnslim's own: apply this postprocessing.pkl (from nnUNetv2_find_best_configuration) to the "
                        "segmentations, as nnUNetv2_apply_postprocessing would; read with an allow-list, never unpickled")
    p.add_argument("--precision", default="auto", choices=precision_choices(),
                   help="nnslim's own: the engine's precision (default auto: the fastest inside its agreement gate "
                        "with PyTorch; fp32 for the closest agreement with nnU-Net)")
    return p


def _environment_int(name: str, default: int = 3) -> int:
    """nnU-Net's $nnUNet_npp / $nnUNet_nps defaults; one that is not a positive integer is ignored, said."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().isdigit() and int(value) > 0:
        return int(value)
    logger.warning("$%s is %r, not a positive integer; using %d", name, value, default)
    return default


def precision_choices() -> tuple[str, ...]:
    from nnslim.compiler.runtime.precision import PRECISIONS

    return ("auto", *PRECISIONS)


def dataset_folder(results: Path, dataset: str) -> Path:
    """nnU-Net's rule: `-d` is a dataset name (`Dataset003_Liver`) or its id (3, 003); never a path."""
    if re.fullmatch(r"\d+", dataset):
        matches = sorted(p for p in results.glob(f"Dataset{int(dataset):03d}_*") if p.is_dir())
        if len(matches) != 1:
            found = "no folder" if not matches else f"{len(matches)} folders ({', '.join(m.name for m in matches)})"
            raise InputError(f"-d {dataset}: $nnUNet_results ({results}) has {found} named Dataset{int(dataset):03d}_*")
        return matches[0]
    if not re.fullmatch(r"Dataset\d+_[\w.-]+", dataset) or ".." in dataset:
        raise InputError(f"-d {dataset}: a dataset is an id (3, 003) or a name like Dataset003_Liver, not a path")
    if not (results / dataset).is_dir():
        raise InputError(f"-d {dataset}: no such dataset folder in $nnUNet_results ({results})")
    return results / dataset


def model_folder(args: argparse.Namespace, configuration: str | None = None) -> Path:
    """The trained model's folder from `$nnUNet_results` and -d, -tr, -p, -c (or `configuration`)."""
    results = os.environ.get("nnUNet_results")
    if not results:
        raise SettingsError("$nnUNet_results is not set; set it to the folder nnU-Net trained into, as for "
                            "nnUNetv2_predict")
    configuration = configuration or args.c
    folder = dataset_folder(Path(results), args.d) / f"{args.tr}__{args.p}__{configuration}"
    if not folder.is_dir():
        raise InputError(f"no trained model at {folder} (trainer {args.tr}, plans {args.p}, configuration "
                         f"{configuration})")
    return folder


def _arguments_record(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """`predict_from_raw_data_args.json` with nnU-Net's keys (`predict_from_files`'s parameters)."""
    return {"list_of_lists_or_source_folder": args.i, "output_folder_or_list_of_truncated_output_files": str(output),
            "save_probabilities": args.save_probabilities, "overwrite": not args.continue_prediction,
            "num_processes_preprocessing": args.npp, "num_processes_segmentation_export": args.nps,
            "folder_with_segs_from_prev_stage": args.prev_stage_predictions, "num_parts": args.num_parts,
            "part_id": args.part_id}


def run(args: argparse.Namespace) -> int:
    """Resolve, build or reuse the engine, segment the folder (after the previous stage, for a
    cascade without -prev_stage_predictions); the exit code."""
    from nnslim.compiler.runtime.nnunet.files import write_provenance

    configurations = args.c if isinstance(args.c, list) else [args.c]
    if len(configurations) > 1:
        return _ensemble_of_configurations(args, configurations)
    args = argparse.Namespace(**{**vars(args), "c": configurations[0]})
    if not 0 <= args.part_id < args.num_parts:
        raise SettingsError(f"-part_id {args.part_id} must be in 0 .. -num_parts - 1 ({args.num_parts - 1})")
    if not 0 < args.step_size <= 1:
        raise SettingsError(f"-step_size must be in (0, 1], got {args.step_size}")
    folder, inputs, output = model_folder(args), Path(args.i), Path(args.o)
    if not inputs.is_dir():
        raise InputError(f"-i {inputs} is not a folder of cases")
    steps = postprocessing_steps(args.pp_pkl_file)
    engine = _engine(folder, args)
    stage = engine.spec.previous_stage
    given = Path(args.prev_stage_predictions) if args.prev_stage_predictions else None
    if stage is None and given is not None:
        raise SettingsError(f"-prev_stage_predictions: configuration {args.c} is not a cascade stage; leave it out")
    if given is not None and not given.is_dir():
        raise InputError(f"-prev_stage_predictions {given} is not a folder of the previous stage's segmentations")
    write_provenance(output, folder, _arguments_record(args, output))
    with contextlib.ExitStack() as stack:
        previous, first_failed = given, set()
        if stage is not None and previous is None:
            previous, first_failed = stack.enter_context(_previous_stage(args, stage["configuration"], inputs, output))
        failed = _segment(engine, args, inputs, output, steps, previous)
    for result in failed:
        why = f"its {stage['configuration']} stage failed, above" if result.name in first_failed else result.error
        click.echo(f"{result.name}: FAILED ({why})", err=True)
    return 4 if failed else 0


def _ensemble_of_configurations(args: argparse.Namespace, configurations: list[str]) -> int:
    """`-c A B ...`: each configuration segments the cases with probabilities into a temporary folder
    inside the output folder, then `nnunet.ensemble` averages them into it (nnU-Net's documented
    nnUNetv2_predict ... --save_probabilities, twice, then nnUNetv2_ensemble); the exit code."""
    from nnslim.compiler.runtime.nnunet.ensemble import ensemble_folders

    if len(set(configurations)) != len(configurations):
        raise SettingsError(f"-c {' '.join(configurations)} names a configuration twice")
    cascades = {c for c in configurations if _is_cascade(model_folder(args, c), c)}  # every folder checked first
    if args.prev_stage_predictions and not cascades:
        raise SettingsError(f"-prev_stage_predictions: none of {' '.join(configurations)} is a cascade stage")
    output = Path(args.o)
    output.mkdir(parents=True, exist_ok=True)
    steps = postprocessing_steps(args.pp_pkl_file)  # a bad file fails before any engine is built
    with tempfile.TemporaryDirectory(prefix=".nnslim-ensemble-", dir=output) as temporary:
        folders, codes = [], []
        for configuration in configurations:
            folders.append(Path(temporary) / configuration)
            given = args.prev_stage_predictions if configuration in cascades else None
            codes.append(run(argparse.Namespace(**{**vars(args), "c": [configuration], "o": str(folders[-1]),
                                                    "save_probabilities": True, "pp_pkl_file": None,
                                                    "continue_prediction": False, "prev_stage_predictions": given})))
        if any(codes):
            click.echo("some cases failed in a configuration; the ensemble is not written", err=True)
            return max(codes)
        ensemble_folders(folders, output, args.save_probabilities, max(1, min(8, args.nps)), steps,
                         progress=not args.disable_progress_bar)
    click.echo(f"nnslim-predict-nnunet: ensembled {' + '.join(configurations)} into {output}", err=True)
    return 0


def _is_cascade(folder: Path, configuration: str) -> bool:
    """Whether `configuration` of the model folder's plans.json is a cascade stage (`previous_stage`)."""
    import json

    from nnslim.compiler.stages.nnunet_plans import resolve_configuration

    try:
        plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
        return bool(resolve_configuration(plans, configuration).get("previous_stage"))
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{folder / 'plans.json'} cannot be read as nnU-Net's plans ({exc})") from None


def postprocessing_steps(pp_pkl_file: str | None) -> tuple[dict, ...]:
    """-pp_pkl_file's steps (`nnunet.postprocessing.read_steps`: allow-listed, never unpickled)."""
    if not pp_pkl_file:
        return ()
    from nnslim.compiler.runtime.nnunet.postprocessing import read_steps

    if not Path(pp_pkl_file).is_file():
        raise InputError(f"-pp_pkl_file {pp_pkl_file} is not a file (nnU-Net writes postprocessing.pkl into "
                         "the crossval_results_folds_* folder of nnUNetv2_find_best_configuration)")
    return tuple(read_steps(pp_pkl_file))


def _engine(folder: Path, args: argparse.Namespace) -> Any:
    """The opened engine of `folder` for -f, -chk and --precision, built into the cache or reused."""
    from nnslim.compiler.runtime.engine import load_engine
    from nnslim.compiler.stages.engine_cache import cached_engine, discard

    device = "cpu" if args.device == "cpu" else "auto"  # auto: the GPU when the engine can use one here
    engine_dir = cached_engine(folder, args.f, args.chk, Path(args.i), args.precision)
    try:
        engine = load_engine(engine_dir, device=device)
    except EngineError as exc:  # a damaged cache entry (a file changed, a build cut short): build it again, once
        logger.warning("the cached engine failed its check (%s); building it again", exc)
        discard(engine_dir)
        engine_dir = cached_engine(folder, args.f, args.chk, Path(args.i), args.precision)
        engine = load_engine(engine_dir, device=device)
    if args.device != "cpu" and getattr(engine.predictor, "device", "cpu") == "cpu":
        logger.warning("-device %s: no GPU this engine can use here; running on the CPU", args.device)
    click.echo(f"nnslim-predict-nnunet: {folder.name}, folds {' '.join(engine.manifest.source.get('folds') or [])}, "
               f"{engine.runtime.label} engine ({engine_dir})", err=True)
    return engine


def _segment(engine: Any, args: argparse.Namespace, inputs: Path, output: Path, steps: tuple[dict, ...],
             previous: Path | None) -> list:
    """Segment the part of `inputs` this run has into `output` as nnU-Net writes it; the failed cases."""
    from nnslim.compiler.runtime.cases.batch import BatchOptions
    from nnslim.compiler.runtime.segmentation import InferenceOptions

    options = InferenceOptions(step_fraction=args.step_size, mirror=not args.disable_tta,
                               progress=not args.disable_progress_bar)
    batch = BatchOptions(io_workers=max(1, min(8, args.nps)), save_probabilities=args.save_probabilities,
                         probabilities_format="nnunet", label_steps=steps, previous_stage=previous)
    with engine:
        results = engine.segment_files([inputs], output, options=options, part=(args.part_id, args.num_parts),
                                       existing="continue" if args.continue_prediction else "overwrite", batch=batch)
    return [r for r in results if r.status == "failed"]


@contextlib.contextmanager
def _previous_stage(args: argparse.Namespace, configuration: str, inputs: Path,
                    output: Path) -> Iterator[tuple[Path, set[str]]]:
    """A cascade's previous stage, run first: its segmentations of this run's cases in a temporary
    folder inside `output` (removed afterwards), as nnU-Net's documented two commands would write
    them; with the names of the cases it failed."""
    folder = model_folder(args, configuration)
    click.echo(f"nnslim-predict-nnunet: {args.c} is a cascade stage; segmenting with {configuration} first "
               "(pass -prev_stage_predictions to use segmentations you have)", err=True)
    engine = _engine(folder, args)
    output.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".nnslim-{configuration}-", dir=output))
    try:
        lowres = argparse.Namespace(**{**vars(args), "save_probabilities": False, "continue_prediction": False})
        failed = _segment(engine, lowres, inputs, temporary, (), None)
        for result in failed:
            click.echo(f"{result.name}: the {configuration} stage FAILED ({result.error})", err=True)
        yield temporary, {result.name for result in failed}
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """The console script: nnU-Net's arguments (exit 2 on a usage error, as argparse does); errors as
    nnslim's CLI reports them (`boundary.translate`: exit 1, or 3 for a bug); 4 when some cases failed."""
    from nnslim.compiler.cli.boundary import translate

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code = run(args)
    except Exception as exc:  # the boundary: every error becomes one report and an exit code
        report = translate(exc, verbose=1 if args.verbose else 0)
        report.show()
        code = report.exit_code
    sys.exit(code)
