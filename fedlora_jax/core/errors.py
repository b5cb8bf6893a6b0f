"""The project's error type for user mistakes.

`UserError` is raised for bad input: a config key, a file, a command-line value. The CLI prints
its one sentence and exits with status 2. Any other exception is a bug and keeps its traceback
(exit 1). It subclasses ValueError so library callers that catch ValueError keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: one sentence naming the bad value and what is allowed."""
