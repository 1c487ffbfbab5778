"""The one exception type for user mistakes.

Raise ``MMError("what is wrong; what to do")`` for bad input (a missing file, a wrong config
value, an unknown model folder). The command line prints its message on one line and exits
non-zero, without a traceback. Programming errors stay ordinary exceptions.
"""


class MMError(Exception):
    """A user-facing error whose message is one line: what is wrong and what to do."""
