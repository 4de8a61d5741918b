"""Where the offline data lives: the shared data folder (``$MULTIPRUNER_DATA_DIR`` or ``shared/data``)
and the files in it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "MULTIPRUNER_DATA_DIR"


def shared_data_dir() -> Path | None:
    """Return the offline data folder, or ``None`` when there is none.

    Looked up on every call (no cached state) so that tests and the CLI can redirect it with
    ``$MULTIPRUNER_DATA_DIR``. Without the variable the first existing of ``./shared/data``,
    ``../shared/data`` (relative to the working directory) and ``<repo root>/../shared/data`` is used.
    """
    override = os.environ.get(DATA_DIR_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            return path.resolve()
        # An explicit override that does not exist must not silently fall back to another folder.
        logger.warning("MULTIPRUNER_DATA_DIR=%s is not a directory; no offline data is used", override)
        return None
    for candidate in _data_dir_candidates():
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _data_dir_candidates() -> tuple[Path, ...]:
    repo_root = Path(__file__).resolve().parents[2]
    return (Path("shared/data"), Path("../shared/data"), repo_root.parent / "shared" / "data")


def expected_data_dir() -> Path:
    """Where the offline data would be looked for last (for messages when there is none)."""
    override = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(override).expanduser() if override else _data_dir_candidates()[-1]


def shared_file(*parts: str) -> Path | None:
    """Path of a file inside the shared data folder, or ``None`` if the folder or file is missing."""
    root = shared_data_dir()
    if root is None:
        return None
    path = root.joinpath(*parts)
    return path if path.is_file() else None
