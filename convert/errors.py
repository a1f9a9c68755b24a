"""The one exception type of the converter.

`ConvertError` subclasses `ValueError`, so callers that already catch `ValueError` keep working; the CLI
catches `ConvertError` and prints its message, which always names the offending file, tensor or value
and what was expected.
"""


class ConvertError(ValueError):
    """A Hugging Face checkpoint or an output folder that cannot be converted/loaded as asked."""
