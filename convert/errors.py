"""The exception types of the converter.

`ConvertError` subclasses `ValueError`, so callers that already catch `ValueError` keep working; the CLI
catches `ConvertError` and prints its message, which always names the offending file, tensor or value
and what was expected.

`ConvertInterrupted` is raised when SIGINT or SIGTERM arrives during a conversion (after the partial
output is removed). It subclasses `KeyboardInterrupt`, so code that stops on Ctrl-C stops on it too.
"""

import signal


class ConvertError(ValueError):
    """A Hugging Face checkpoint or an output folder that cannot be converted/loaded as asked."""


class ConvertInterrupted(KeyboardInterrupt):
    """A conversion stopped by a signal; `signum` is the signal number."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
