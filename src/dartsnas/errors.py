"""The one exception type users see as a one-line message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix.

    The command line prints ``dartsnas: error: <message>`` and exits with status 2; the Python API
    lets it propagate like any exception.
    """
