"""The CLI's subcommands, grouped by what they do; each is ``add_X`` (its flags) and ``cmd_X`` (its work).

Every command checks what it can before its model loads (which takes seconds to minutes): settings, output
paths, plan files, the model's files, text files and task names; a refusal is one line and writes nothing.
"""

from __future__ import annotations

from ..errors import UsageError


class CliError(UsageError):
    pass
