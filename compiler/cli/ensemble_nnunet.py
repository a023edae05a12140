"""`nnslim-ensemble-nnunet`: nnU-Net v2's `nnUNetv2_ensemble`, with its arguments and its output.

    nnUNetv2_ensemble       -i predictions_3d_fullres predictions_2d -o ensemble -np 8
    nnslim-ensemble-nnunet  -i predictions_3d_fullres predictions_2d -o ensemble -np 8

Each input folder is the output of `nnUNetv2_predict --save_probabilities` or
`nnslim-predict-nnunet --save_probabilities`. The probabilities are averaged and labelled as nnU-Net
does (`runtime.nnunet.ensemble`); the `.pkl` files are read with an allow-list, never unpickled.
nnslim's own option: `-pp_pkl_file`, nnU-Net's postprocessing.pkl applied to the ensembled
segmentations (what `nnUNetv2_apply_postprocessing` would do next).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import click

from nnslim.errors import SettingsError


def parser() -> argparse.ArgumentParser:
    """`nnUNetv2_ensemble`'s arguments (nnU-Net v2.8), with nnslim's help."""
    p = argparse.ArgumentParser(
        prog="nnslim-ensemble-nnunet", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="nnUNetv2_ensemble: average the probabilities of several prediction folders and label them.",
        epilog="examples:\n"
               "  nnslim-ensemble-nnunet -i pred_3d_fullres pred_2d -o ensemble\n"
               "  nnslim-ensemble-nnunet -i pred_3d_fullres pred_3d_lowres -o ensemble -np 4 --save_npz "
               "-pp_pkl_file postprocessing.pkl")
    p.add_argument("-i", nargs="+", required=True, help="prediction folders (each with CASE.npz, CASE.pkl, "
                                                        "dataset.json)")
    p.add_argument("-o", required=True, help="output folder (created if missing)")
    p.add_argument("-np", type=int, default=3, help="cases merged at once (threads, at most 8; default 3)")
    p.add_argument("--save_npz", action="store_true", help="also write the averaged CASE.npz and CASE.pkl")
    p.add_argument("-pp_pkl_file", default=None,
                   help="nnslim's own: apply this postprocessing.pkl to the ensembled segmentations (read with an "
                        "allow-list, never unpickled)")
    p.add_argument("--disable_progress_bar", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    """The console script; errors as nnslim's CLI reports them (`boundary.translate`)."""
    from nnslim.compiler.cli.boundary import translate
    from nnslim.compiler.cli.predict_nnunet import postprocessing_steps
    from nnslim.compiler.runtime.nnunet.ensemble import ensemble_folders

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.np < 1:
            raise SettingsError(f"-np must be at least 1, got {args.np}")
        written = ensemble_folders([Path(f) for f in args.i], Path(args.o), args.save_npz, args.np,
                                   postprocessing_steps(args.pp_pkl_file), progress=not args.disable_progress_bar)
        click.echo(f"nnslim-ensemble-nnunet: {len(written)} case(s) from {len(args.i)} folder(s) -> {args.o}",
                   err=True)
        code = 0
    except Exception as exc:  # the boundary: every error becomes one report and an exit code
        report = translate(exc, verbose=0)
        report.show()
        code = report.exit_code
    sys.exit(code)
