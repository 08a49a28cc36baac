"""The one exception users see: its message names the problem and the fix, in one line."""


class CalqError(Exception):
    """A user-facing error: the message names the problem and the fix, in one line."""
