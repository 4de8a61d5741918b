"""The base of every error a user can cause and fix; the CLI prints its message without a traceback."""


class UsageError(ValueError):
    """Bad input (a flag, a file, a model, a run directory); the message names the problem and the fix."""
