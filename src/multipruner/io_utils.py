"""Output files and directories: checked before any work, then written atomically, so a reader (or a resumed
run) never sees a half-written result."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError


class OutputPathError(UsageError):
    """An output that could not be written, or that exists and may not be replaced."""


def check_output(
    path: str | Path,
    *,
    directory: bool = False,
    overwrite: bool = True,
    flag: str = "--output",
    example: str = "output.json",
) -> None:
    """Refuse, before any work, an output that could not be written: a directory where a file goes (or a file
    where a directory goes), an existing output without ``overwrite``, or a place that is not writable.

    ``flag`` names the option in messages; ``example`` is a file name suggested when a directory is given.
    """
    target = Path(path)
    if not directory and target.is_dir():
        raise OutputPathError(f"{flag} {target} is a directory; give a file name such as {target / example}")
    if directory and target.exists() and not target.is_dir():
        raise OutputPathError(f"{flag} {target} is a file; it must be a directory: choose another {flag}")
    if target.exists() and not overwrite:
        raise OutputPathError(f"{flag} {target} already exists; pass --overwrite to replace it")
    # the nearest existing place must take new entries: an output directory that exists (a resumed run
    # writes into it), else the nearest folder above (where the output, or the folders to it, will be made)
    start = target.absolute() if directory else target.absolute().parent
    existing = next(p for p in (start, *start.parents) if p.exists())
    if not existing.is_dir():
        raise OutputPathError(
            f"{flag} {target}: {existing} is a file, not a directory: choose another {flag}"
        )
    if not os.access(existing, os.W_OK):
        raise OutputPathError(
            f"{flag} {target} is not writable ({existing} is read-only): choose another {flag}"
        )


def _atomic_write(path: Path, data: str | bytes, mode: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        follow_umask(Path(tmp))  # mkstemp creates 0600
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


def follow_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the permissions the umask allows, as
    outputs should have: temporary files are created private (0600/0700), and so are the files libraries
    write through them (transformers' weight shards)."""
    mask = current_umask()
    for item in (path, *path.rglob("*")) if path.is_dir() else (path,):
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to ``target`` in one step.

    An interrupted write leaves only a hidden ``.target.partial-*`` directory, never a ``target`` that
    looks complete.
    """
    target = Path(target)
    check_output(target, directory=True, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        yield tmp
        follow_umask(tmp)
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
