"""Atomic writes: a reader sees the old output or the whole new one, never a torn one.

Single files are written to a temporary sibling (``.<name>.<pid>.partial``), fsynced, then
``os.replace``d over the target and the directory fsynced. Directories (PEFT, mlx-lm outputs,
sharded checkpoints) are built in a temporary sibling directory and renamed into place; an
existing target is first renamed aside and removed only after the new one is in place.

The writer's pid is in every temporary name, so leftovers of a killed writer are recognised
and removed by the next write to the same target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["atomic_file", "atomic_directory", "fsync_directory", "remove_stale_partials",
           "PARTIAL_SUFFIX"]

PARTIAL_SUFFIX = ".partial"


def fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: Path) -> None:
    """Remove temporaries of ``target`` left by writers that no longer run."""
    parent = target.parent
    prefix = f".{target.name}."
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)):
            continue
        middle = name[len(prefix):-len(PARTIAL_SUFFIX)]
        pid_text = middle.split(".", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _temp_name(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file for binary writing; on success it replaces ``path`` atomically.

    On any exception the temporary is removed and ``path`` is left as it was.
    """
    target = Path(path)
    remove_stale_partials(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_temp_name(target), suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(target.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes ``path`` in one rename.

    Files written inside should be closed by the time the block ends; they are fsynced here.
    """
    target = Path(path)
    remove_stale_partials(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_name(target), suffix=PARTIAL_SUFFIX))
    old: Path | None = None
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_directory(Path(root))
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_name(target),
                                        suffix=".old" + PARTIAL_SUFFIX))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.rename(old, target)  # put the previous output back
            old = None
        raise
    finally:
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    old.unlink()
    fsync_directory(target.parent)
