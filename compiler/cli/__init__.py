"""The `nnslim` command line.

Each command parses its options into a config and calls one library function; heavy imports
happen inside the commands so `--help` is instant. Failures are reported in one place
(`boundary`): exit 1 for errors a user can fix, 2 for usage errors, 3 for internal errors.

Modules: `app` (the group), `boundary` (errors and exit codes), `options` (shared options),
`train_commands`, `build_commands` (build-engine), `infer_commands` (infer, evaluate),
`tool_commands` (inspect, export-triton, bench, prune-sweep).
"""

from __future__ import annotations

from nnslim.compiler.cli.app import cli
from nnslim.compiler.cli.build_commands import build_engine
from nnslim.compiler.cli.infer_commands import evaluate, infer
from nnslim.compiler.cli.options import PRESET_NAMES
from nnslim.compiler.cli.tool_commands import bench, export_triton, inspect, prune_sweep
from nnslim.compiler.cli.train_commands import prepare_dataset, pseudo_label, train

for _command in (prepare_dataset, train, build_engine, infer, evaluate, pseudo_label, bench, export_triton,
                 prune_sweep, inspect):
    cli.add_command(_command)

__all__ = ["PRESET_NAMES", "cli", "main"]


def main() -> None:
    """Console entry point."""
    cli(prog_name="nnslim")
