"""How the entry points end on bad input: one line `error: <message>` on stderr and exit status 2,
as argparse does, instead of a traceback whose last line is the message.

User errors are the `ValueError`s and `FileNotFoundError`s the toolkit raises on bad flags,
files, columns or models, before any work. Anything else is an internal error and keeps its
traceback; `EARLY_EXIT_DEBUG=1` keeps the traceback of user errors too.
"""

import os
import sys
from typing import Callable, TypeVar

USER_ERRORS = (ValueError, FileNotFoundError)
DEBUG_VARIABLE = "EARLY_EXIT_DEBUG"

T = TypeVar("T")


def run_entry_point(function: Callable[..., T], *args, **kwargs) -> T:
    """Call an entry point's main; a user error ends the process with `error: ...` and status 2."""
    try:
        return function(*args, **kwargs)
    except USER_ERRORS as error:
        if os.environ.get(DEBUG_VARIABLE) == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
