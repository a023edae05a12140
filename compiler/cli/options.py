"""Options and parameter types shared by several commands, defined once.

Every name a user chooses among (backend, precision, skip mode, device, blending, reader) comes
from its table (`TableChoice`); none is spelt out here. The tables' modules import no torch, so
`--help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import click

from nnslim.compiler.runtime.manifest.schema import MAX_PATCH
from nnslim.errors import SettingsError
from nnslim.training.presets import PRESETS

# the presets module is plain data (no torch), so --help stays instant
PRESET_NAMES = list(PRESETS)


class TableChoice(click.Choice):
    """A `click.Choice` whose values are read from a table each time they are needed, so an entry
    registered in the table (a new backend, a new precision) is accepted with no edit here.

    Args:
        table: returns the table's names (a dict's keys, a tuple).
        extra: values offered before the table's (e.g. "auto").
    """

    def __init__(self, table: Callable[[], Iterable[str]], extra: tuple[str, ...] = ()) -> None:
        self.table, self.extra = table, extra
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return (*self.extra, *self.table())

    @choices.setter
    def choices(self, value: Iterable[str]) -> None:  # click assigns it in Choice.__init__; the table decides
        pass


def backends() -> tuple[str, ...]:
    """Backends a user names: every backend except GPU twins (`--device cuda` picks those)."""
    from nnslim.compiler.runtime.backends import BACKENDS

    twins = {b.gpu_twin for b in BACKENDS.values() if b.gpu_twin}
    return tuple(name for name in BACKENDS if name not in twins)


def precisions() -> tuple[str, ...]:
    from nnslim.compiler.runtime.precision import PRECISIONS

    return tuple(PRECISIONS)


def skip_modes() -> tuple[str, ...]:
    from nnslim.compiler.runtime.window.selection import SKIP_MODES

    return tuple(SKIP_MODES)


def devices() -> tuple[str, ...]:
    from nnslim.compiler.runtime.backends.devices import DEVICE_CHOICES

    return DEVICE_CHOICES


def blending_modes() -> tuple[str, ...]:
    from nnslim.compiler.runtime.window.blending import BLENDING_MODES

    return BLENDING_MODES


def window_rules() -> tuple[str, ...]:
    from nnslim.compiler.runtime.window.rules import WINDOW_RULES

    return tuple(WINDOW_RULES)


def probabilities_formats() -> tuple[str, ...]:
    from nnslim.compiler.runtime.cases.batch import PROBABILITIES_FORMATS

    return PROBABILITIES_FORMATS


def path_type(exists: bool = True, **kwargs) -> click.Path:
    return click.Path(exists=exists, path_type=Path, **kwargs)


def progress_option(f):
    return click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")(f)


def out_dir_option(help_text: str | None = None):
    return click.option("--out", "out_dir", required=True, type=path_type(exists=False, file_okay=False), help=help_text)


def patch_option(help_text: str):
    """Three sizes, each at most the runtime's limit (an engine with a larger patch would be refused)."""
    return click.option("--patch", nargs=3, type=click.IntRange(1, MAX_PATCH), default=None, help=help_text)


def patch_tuple(patch) -> tuple[int, int, int] | None:
    return tuple(patch) if patch else None


def _is_list_value(arg: str) -> bool:
    """An integer, nnU-Net's fold name "all", or a comma-separated list of them ("0,1,2")."""
    parts = [p for p in arg.split(",") if p]
    return bool(parts) and all(p.isdigit() or p == "all" for p in parts)


def list_options_command(*names: str) -> type[click.Command]:
    """A command class that reads `--opt 0 1 2` and `--opt 0,1,2` as `--opt 0 --opt 1 --opt 2` for
    the named `multiple=True` options (values: integers, or "all" as nnU-Net names its fold), as
    users of nnU-Net type them."""

    class ListOptionsCommand(click.Command):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            expanded, current, pending = [], None, False
            for arg in args:
                if current and _is_list_value(arg):
                    expanded += [x for value in arg.split(",") if value for x in (current, value)]
                    pending = False
                    continue
                if pending:  # a list option without a list value: let click parse (and judge) it
                    expanded.append(current)
                current = arg if arg in names else None
                pending = current is not None
                if current is None:
                    expanded.append(arg)
            if pending:
                expanded.append(current)
            return super().parse_args(ctx, expanded)

    return ListOptionsCommand


def fold_names(folds: tuple[str, ...]) -> tuple[str, ...]:
    """Fold names from repeated --folds (see `list_options_command`), also `--folds=0,1,2`."""
    names = [f for group in folds for f in group.replace(",", " ").split()]
    return tuple(names) or None


def float_list(ctx, param, value):
    """Callback: "0,0.5,0.9" -> (0.0, 0.5, 0.9)."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


def checked(check: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback running one of the runtime's own checks (`safety`): the API refuses the same
    values, and here they are usage errors that name the option."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except SettingsError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc

    return callback


def part_number(minimum: int) -> Callable[[click.Context, click.Parameter, Any], int | str]:
    """A click callback for --part-id / --num-parts: a whole number >= `minimum`, or "auto" (from the
    scheduler's variables: `cases.parts`)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> int | str:
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        try:
            number = int(text)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a whole number or 'auto'", ctx=ctx, param=param) from None
        if number < minimum:
            raise click.BadParameter(f"{number} is below {minimum}", ctx=ctx, param=param)
        return number

    return callback
