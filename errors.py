"""
The errors the project raises on purpose: bad input, or a state the user can change, named with its fix. Every
script shows one of them as one line ("error: ..."), exit code 2, once under torchrun (configurator.py's hook);
any other exception is a bug and keeps its traceback (NANOMLA_TRACEBACK=1 shows every traceback).

Each is also the built-in type a caller would expect, so `except ValueError` (or FileNotFoundError, ...) still
catches it. The bottom of the project: it imports nothing.
"""


class Refusal(Exception):
    """Raised on purpose: the message names the problem and the fix."""


class BadInput(Refusal, ValueError):
    """A setting, file or model that cannot do what was asked."""


class BadType(Refusal, TypeError):
    """A setting of the wrong type."""


class UnknownSetting(Refusal, KeyError):
    """A setting no script has."""

    def __str__(self):  # KeyError would print its message in quotes
        return self.args[0]


class NotFound(Refusal, FileNotFoundError):
    """A path or hub id that is not there."""


class Occupied(Refusal, FileExistsError):
    """A path holding something this project did not write: never replaced."""


class Busy(Refusal, RuntimeError):
    """A folder another run is using."""


class CannotWrite(Refusal, OSError):
    """A disk that is full or read-only."""
