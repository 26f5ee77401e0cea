"""The one exception type that user-facing entry points raise for bad input."""


class SlimkitError(Exception):
    """A problem with the user's input or environment, explained in one message.

    The CLI prints the message (no traceback) and exits with status 2.
    """
