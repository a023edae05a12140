"""Exceptions the runtime raises; the CLI turns them into one clear message and exit code 1."""


class NnslimError(Exception):
    """Base class: an error the user can fix (bad input, stale engine, failed check)."""


class InputError(NnslimError, ValueError):
    """An input volume that cannot be segmented (missing, wrong channels, NaN, bad shape)."""


class EngineError(NnslimError):
    """An engine directory that is incomplete, tampered with, or built for another setup."""


class SettingsError(NnslimError, ValueError):
    """Settings that are out of range or contradict each other (the values and the fix in the message)."""
