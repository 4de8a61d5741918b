"""Atomic file and directory writes: a reader (or a resumed run) never sees a half-written result."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _atomic_write(path: Path, data: str | bytes, mode: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; outputs follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(directory: Path, name: str | None = None) -> None:
    """Delete leftovers of our atomic writes that a killed process left in ``directory`` (of ``name`` only,
    if given). Call only where no other live process can be writing (e.g. under the run's lock)."""
    prefix = f".{name}." if name else "."
    for path in Path(directory).glob(f"{prefix}*"):
        if path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
        elif path.is_dir() and (".partial-" in path.name or ".old-" in path.name):
            shutil.rmtree(path, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, text, "w")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, data, "wb")


def append_line_durably(path: Path, line: str) -> None:
    """Append one JSON line and fsync, so a kill leaves at most a torn last line (which readers skip)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _follow_umask(tree: Path) -> None:
    """Give every file and folder under ``tree`` the permissions the umask allows: libraries that write
    through private temporary files (transformers' weight shards) would otherwise leave them 0600."""
    mask = current_umask()
    for path in tree.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to ``target`` in one step.

    An interrupted write leaves only a hidden ``.target.partial-*`` directory, never a ``target`` that
    looks complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"output directory {target} already exists (pass overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        _follow_umask(tmp)
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
