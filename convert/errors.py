"""The exception types of the converter.

`ConvertError` subclasses `ValueError`, so callers that already catch `ValueError` keep working; the CLI
catches `ConvertError` and prints its message, which always names the offending file, tensor or value
and what was expected. `ConvertArgumentError` (a `ConvertError`) marks a bad argument rather than a bad
checkpoint.

`ConvertInterrupted` is raised when SIGINT or SIGTERM arrives during a conversion (after the partial
output is removed). It subclasses `KeyboardInterrupt`, so code that stops on Ctrl-C stops on it too.
"""

import signal


class ConvertError(ValueError):
    """A Hugging Face checkpoint or an output folder that cannot be converted/loaded as asked."""


class ConvertArgumentError(ConvertError):
    """An argument of the call itself is unusable (an OUT_DIR that is not absent or an empty folder, or whose
    parent folder is missing; an unknown dtype), found before any checkpoint is read. The CLI reports it as a
    rejected command line (exit code 2), not as a failed run."""


class ConvertInterrupted(KeyboardInterrupt):
    """A conversion stopped by a signal; `signum` is the signal number."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
