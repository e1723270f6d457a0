"""The one exception type users see from this pack.

Every message says what was wrong and what to do about it. It subclasses ValueError so
callers that only know the public API contract (``ValueError`` for bad input) still catch it.
"""


class LoRWeBError(ValueError):
    """A bad input: a file, a config value, an image or a model that does not fit."""
