"""The error root: every error nnslim raises for something a user can fix.

The CLI turns these into one line `error: ...` and exit code 1 (`nnslim.compiler.cli.boundary`);
anything else that escapes is a bug (exit 3). The build, the runtime and training all raise these.
"""


class NnslimError(Exception):
    """Base class: an error the user can fix (bad input, stale engine, failed check)."""


class InputError(NnslimError, ValueError):
    """An input volume that cannot be segmented (missing, wrong channels, NaN, bad shape)."""


class EngineError(NnslimError):
    """An engine directory that is incomplete, tampered with, or built for another setup."""


class SettingsError(NnslimError, ValueError):
    """Settings that are out of range or contradict each other (the values and the fix in the message)."""
