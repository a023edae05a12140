"""The CLI's one error boundary: every failure leaves `nnslim` as one line and a documented exit code.

- 1: an error the user can fix. Every nnslim error (`NnslimError`: bad input, stale engine, failed
  parity, impossible architecture) and the operating system's expected refusals (disk full,
  read-only file system, permission denied, a directory where a file belongs, a file size limit).
  One line `error: ...` naming the file or value and what to do.
- 2: a usage error (unknown option, bad value); click reports those itself.
- 3: anything else is a bug in nnslim: `internal error: <type>: <message>` and a hint to rerun with
  `-v`, which prints the traceback.
- 4: `infer` on a folder finished, but some cases failed (each reported on its own line; the
  others were written).
"""

from __future__ import annotations

import errno
import logging
import traceback

import click

from nnslim.errors import NnslimError
from nnslim.extras import EXTRAS, missing_extra

EXIT_USER_ERROR = 1
EXIT_USAGE_ERROR = 2  # click's own
EXIT_INTERNAL_ERROR = 3
EXIT_SOME_CASES_FAILED = 4

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  an error you can fix: bad input or settings, a failed check, disk full, read-only or
     permission denied (one line `error: ...` says what and what to do)
  2  a usage error: unknown option, bad option value
  3  an internal error (a bug): rerun with -v for the traceback and report it
  4  infer: some cases of a folder failed (each is reported; the others were written)
"""

# The operating system's refusals a user can act on, and what to do about each.
OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space there or write to another disk",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "permission denied: check the permissions or choose another location",
    errno.EPERM: "operation not permitted: check the permissions or choose another location",
    errno.EISDIR: "this path is a directory: give a file name",
    errno.ENOTDIR: "a part of this path is a file, not a directory: check the path",
    errno.EFBIG: "the file is larger than allowed (`ulimit -f` or the file system's limit): "
                 "raise the limit or write elsewhere",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EEXIST: "it already exists: remove it or choose another name",
    errno.ENOTEMPTY: "the directory is not empty: remove it or choose another name",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.EMFILE: "too many open files: raise `ulimit -n`",
    errno.EPIPE: "the output pipe was closed before nnslim finished writing",
}

log = logging.getLogger(__name__)


class UserError(click.ClickException):
    """An expected failure, shown as one line `error: ...`, exit code 1."""

    exit_code = EXIT_USER_ERROR

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


class InternalError(click.ClickException):
    """An unexpected exception (a bug): one line and the -v hint, or the traceback with -v; exit 3."""

    exit_code = EXIT_INTERNAL_ERROR

    def __init__(self, cause: Exception, verbose: bool) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause, self.verbose = cause, verbose

    def show(self, file=None) -> None:
        if self.verbose:
            text = "".join(traceback.format_exception(type(self.cause), self.cause, self.cause.__traceback__))
            click.echo(text.rstrip(), err=True, file=file)
        click.echo(f"internal error: {self.format_message()}", err=True, file=file)
        if not self.verbose:
            click.echo("run with -v for the traceback (nnslim -v COMMAND ...) and report it", err=True, file=file)


def describe_os_error(exc: OSError) -> str | None:
    """One line for an expected OSError (the path, the system's words, what to do); None if unexpected."""
    hint = OS_ERROR_HINTS.get(exc.errno)
    if hint is None:
        return None
    where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "") if exc.filename else "(no path given)"
    return f"{where}: {exc.strerror or exc} [{errno.errorcode.get(exc.errno, exc.errno)}]; {hint}"


def translate(exc: Exception, verbose: int) -> click.ClickException:
    """The click exception that reports `exc`: a user error (exit 1) or an internal error (exit 3)."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] in EXTRAS:
        exc = missing_extra(exc.name)  # an optional part not installed: name its extra
    if isinstance(exc, NnslimError):
        log.debug("nnslim error", exc_info=exc)
        return UserError(str(exc))
    if isinstance(exc, OSError) and (line := describe_os_error(exc)) is not None:
        log.debug("operating system error", exc_info=exc)
        return UserError(line)
    return InternalError(exc, verbose=verbose > 0)


class NnslimGroup(click.Group):
    """A click group whose subcommands' failures go through `translate`, in this one place."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # the boundary: every other exception becomes one report
            raise translate(exc, ctx.params.get("verbose", 0)) from exc
