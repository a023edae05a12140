"""The `nnslim` click group: logging verbosity, version, and the error boundary (`boundary`)."""

from __future__ import annotations

import logging

import click

from nnslim.compiler.cli.boundary import EXIT_CODES_HELP, NnslimGroup

EPILOG_MAIN = """\b
Examples:
  nnslim prepare-dataset mni-tissue artifacts/data/mni-tissue
  nnslim train --preset tiny --dataset mni-tissue --out artifacts/runs/tiny
  nnslim build-engine artifacts/models/mni-tissue-tiny.pt --out artifacts/engines/tiny
  nnslim infer artifacts/engines/tiny scan.nii.gz -o seg.nii.gz
  nnslim inspect artifacts/engines/tiny

""" + EXIT_CODES_HELP


@click.group(cls=NnslimGroup, epilog=EPILOG_MAIN)
@click.option("-v", "--verbose", count=True, help="Log more (-v info and tracebacks, -vv debug).")
@click.version_option(package_name="nnslim")
def cli(verbose: int) -> None:
    """nnslim: compile 3D U-Nets into small, fast engines and segment volumes with them."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
