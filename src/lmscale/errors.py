"""The one exception a user can cause.

Anything raised as `LmscaleError` is the user's to fix (a bad path, a bad config value, a corrupt
file). The CLI prints its message on one line and exits 2; everything else is a bug and keeps its
traceback.
"""


class LmscaleError(Exception):
    """A mistake in the user's input, explained in one line."""
