"""The base of every error a user can cause and fix; the CLI prints its message without a traceback."""


class UsageError(ValueError):
    """Bad input (a flag, a file, a model, a run directory); the message names the problem and the fix."""


def listing(what: str, problems) -> str:
    """One error line for several problems: ``"invalid X: first; second"`` (duplicates dropped)."""
    return f"{what}: " + "; ".join(dict.fromkeys(problems))
