"""User-facing errors.

Anything a user can cause (a missing dataset, a bad flag value, a corrupt
checkpoint, an unreadable image) raises :class:`CifarlensError` with a one-line
message that names the problem and the fix. The CLI prints it without a
traceback; programming errors are left to propagate as usual.
"""


class CifarlensError(Exception):
    """An error caused by the user's input, with a message meant for them."""
