"""Errors that commands report as one line with exit code 2."""


class UserError(Exception):
    """Invalid input from the caller: a bad path, value, alias or config.

    The message names the value and the fix, fits on one line and is shown without a traceback.
    """
