"""The `nnslim` command line.

Each command parses its options into a config and calls one library function; heavy imports
happen inside the commands so `--help` is instant. Failures are reported in one place
(`boundary`): exit 1 for errors a user can fix, 2 for usage errors, 3 for internal errors.

Modules: `app` (the group), `boundary` (errors and exit codes), `options` (shared options),
`train_commands`, `build_commands` (build-engine), `infer_commands` (infer, evaluate),
`tool_commands` (inspect, export-triton, serve, report, bench, prune-sweep).
"""

from __future__ import annotations

import signal

import click

from nnslim.compiler.cli.app import cli
from nnslim.compiler.cli.build_commands import build_engine
from nnslim.compiler.cli.infer_commands import evaluate, infer
from nnslim.compiler.cli.options import PRESET_NAMES
from nnslim.compiler.cli.tool_commands import bench, export_triton, inspect, prune_sweep, report, serve
from nnslim.compiler.cli.train_commands import prepare_dataset, pseudo_label, train

for _command in (prepare_dataset, train, build_engine, infer, evaluate, pseudo_label, bench, export_triton,
                 serve, report, prune_sweep, inspect):
    cli.add_command(_command)

__all__ = ["PRESET_NAMES", "cli", "main"]


def main() -> None:
    """Console entry point. SIGTERM (a scheduler's or `kill`'s stop) is handled like Ctrl-C: it
    raises where the program is, so every `finally` runs and no temporary is left behind."""
    signal.signal(signal.SIGTERM, _terminated)
    cli(prog_name="nnslim")


def _terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM stops at once
    click.echo("error: stopped by SIGTERM; nothing half-written is left", err=True)
    raise SystemExit(128 + signum)
