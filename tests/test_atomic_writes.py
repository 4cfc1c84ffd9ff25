"""Writes under faults: the old output survives intact and no temporary is left behind.

Faults are injected by wrapping the file object that ``atomic_file`` opens (``os.fdopen``)
so that it fails after k bytes, by making creation fail with EACCES, by a real unwritable
directory (not as root), and by SIGKILLing a child process in the middle of a slow write.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import portable_lora as pl
from portable_lora.io import atomic
from portable_lora.io.atomic import PARTIAL_SUFFIX, atomic_directory, atomic_file, remove_stale_partials
from portable_lora.io.safetensors_io import SafetensorsFile

REPO = Path(__file__).resolve().parents[1]
OLD = b"the previous output, which must survive\n" * 10


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(PARTIAL_SUFFIX))


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class Interrupted(Exception):
    pass


class FaultyHandle:
    """A writable file object that writes ``budget`` bytes, then raises ``error``."""

    def __init__(self, handle, budget: int, error: BaseException):
        self._handle, self._budget, self._error = handle, budget, error
        self.written = 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        room = self._budget - self.written
        if len(data) > room:
            self._handle.write(data[:max(room, 0)])
            self.written += max(room, 0)
            raise self._error
        self.written += len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


@pytest.fixture
def fail_after(monkeypatch):
    """``fail_after(k, error)``: the next file ``atomic_file`` opens fails after k bytes."""
    handles: list[FaultyHandle] = []

    def arm(budget: int, error: BaseException):
        real = os.fdopen

        def fdopen(fd, *args, **kwargs):
            handle = FaultyHandle(real(fd, *args, **kwargs), budget, error)
            handles.append(handle)
            return handle

        monkeypatch.setattr(os, "fdopen", fdopen)
        return handles

    return arm


def _adapter(seed: int) -> pl.Adapter:
    return pl.examples.random_adapter({"m.q": (16, 12), "m.v": (12, 16)}, rank=4, seed=seed)


def _same(a: pl.Adapter, b: pl.Adapter) -> bool:
    return list(a) == list(b) and all(
        np.array_equal(a[n].A, b[n].A) and np.array_equal(a[n].B, b[n].B) for n in a)


# -- single files ------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, 1, 5, 8, 100, 999])
@pytest.mark.parametrize("error", [Interrupted("stop"), KeyboardInterrupt(), OSError(errno.EIO, "I/O error")],
                         ids=["exception", "keyboard-interrupt", "EIO"])
def test_atomic_file_interrupted_after_k_bytes(tmp_path, fail_after, budget, error):
    target = tmp_path / "out.bin"
    target.write_bytes(OLD)
    fail_after(budget, error)
    with pytest.raises(type(error)):
        with atomic_file(target) as out:
            for _ in range(10):
                out.write(b"n" * 100)
    assert target.read_bytes() == OLD
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("budget", [0, 4, 8, 30, 500, 800, 1600])
def test_portable_save_interrupted_after_k_bytes(tmp_path, fail_after, budget):
    """k inside the length prefix, the header (800 bytes), and the data of a 1.7 kB file."""
    target = tmp_path / "adapter.safetensors"
    old = _adapter(seed=1)
    pl.save(old, target)
    old_bytes = target.read_bytes()
    handles = fail_after(budget, Interrupted("cut"))
    with pytest.raises(Interrupted):
        pl.save(_adapter(seed=2), target)
    assert handles and handles[0].written == budget < len(old_bytes)  # the fault hit where intended
    assert target.read_bytes() == old_bytes and _same(pl.load(target), old)
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("budget", [0, 500])
def test_enospc_keeps_the_old_output_and_names_the_target(tmp_path, fail_after, budget):
    target = tmp_path / "adapter.safetensors"
    pl.save(_adapter(seed=1), target)
    old_bytes = target.read_bytes()
    fail_after(budget, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(OSError) as info:
        pl.save(_adapter(seed=2), target)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target)  # not the vanished temporary
    assert target.read_bytes() == old_bytes and temporaries(tmp_path) == []


def test_enospc_at_fsync_time_of_a_durable_write(tmp_path, monkeypatch):
    """Small writes sit in the buffer: the failure comes at fsync, and is handled the same."""
    target = tmp_path / "small.json"
    target.write_bytes(OLD)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as info:
        with atomic_file(target, durable=True) as out:
            out.write(b"{}")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == OLD and temporaries(tmp_path) == []


@pytest.mark.parametrize("how", ["argument", "context", "environment", "off"])
def test_durable_writes_fsync_file_and_directory(tmp_path, monkeypatch, how):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.delenv(atomic.DURABLE_ENV, raising=False)
    if how == "environment":
        monkeypatch.setenv(atomic.DURABLE_ENV, "1")
    with atomic.durable_writes(True if how == "context" else None):
        pl.save(_adapter(seed=1), tmp_path / "a.safetensors",
                **({"durable": True} if how == "argument" else {}))
        with atomic.atomic_directory(tmp_path / "d", durable=True if how == "argument" else None) as d:
            (d / "x.bin").write_bytes(b"x")
    if how == "off":
        assert synced == [] and not atomic.is_durable()
    else:  # the file, its directory; then the tree (its file, itself) and the parent
        assert synced.count("file") == 2 and synced.count("dir") >= 3
    assert pl.load(tmp_path / "a.safetensors") is not None and (tmp_path / "d" / "x.bin").read_bytes() == b"x"


def test_background_writer_failure_reaches_the_caller(tmp_path, fail_after):
    """ENOSPC inside the writer thread: raised to the producer, naming the target; old file kept."""
    from portable_lora.io.safetensors_io import LazyTensor, write_safetensors

    big = np.arange(3000, dtype=np.float32).reshape(100, 30)
    path = tmp_path / "out.safetensors"
    path.write_bytes(OLD)
    fail_after(20000, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    lazy = LazyTensor(np.dtype(np.float32), (100, 30), lambda: (big[i:i + 10] for i in range(0, 100, 10)))
    with pytest.raises(OSError) as info:
        write_safetensors(path, {f"t{i}": lazy for i in range(10)}, background=True)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == OLD and temporaries(tmp_path) == []


def test_cannot_create_the_temporary(tmp_path, monkeypatch):
    """EACCES at creation (what an unwritable directory gives a non-root user), simulated."""
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(OLD)
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if os.fspath(path).endswith(PARTIAL_SUFFIX):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionError) as info:
        pl.save(_adapter(seed=1), target)
    assert info.value.filename == str(target)
    assert target.read_bytes() == OLD and temporaries(tmp_path) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: directory permissions are not enforced for root "
                           "(test_cannot_create_the_temporary simulates the EACCES instead)")
def test_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    target = locked / "adapter.safetensors"
    target.write_bytes(OLD)
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError) as info:
            pl.save(_adapter(seed=1), target)
        assert info.value.filename == str(target)
        assert target.read_bytes() == OLD and temporaries(locked) == []
        with pytest.raises(PermissionError):
            with atomic_directory(locked / "dir"):
                pass
    finally:
        locked.chmod(0o700)


def test_target_is_a_directory(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep").write_bytes(OLD)
    with pytest.raises(IsADirectoryError) as info:
        with atomic_file(target) as out:
            out.write(b"x")
    assert info.value.filename == str(target)
    assert (target / "keep").read_bytes() == OLD and temporaries(tmp_path) == []


def test_saved_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    pl.save(_adapter(seed=1), tmp_path / "a.safetensors")
    with open(tmp_path / "plain", "wb"):
        pass
    mode = (tmp_path / "a.safetensors").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777 == 0o666 & ~umask
    with atomic_directory(tmp_path / "d") as d:
        (d / "x").write_bytes(b"")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask


def test_saving_over_the_file_being_read(tmp_path):
    target = tmp_path / "adapter.safetensors"
    old, new = _adapter(seed=1), _adapter(seed=2)
    pl.save(old, target)
    with SafetensorsFile(target) as reader:
        view = reader.get("m.q.lora_A", copy=False)  # memory-mapped
        pl.save(new, target)
        np.testing.assert_array_equal(view, old["m.q"].A)  # the reader still sees the old data
        np.testing.assert_array_equal(reader.get("m.v.lora_B"), old["m.v"].B)
    np.testing.assert_array_equal(view, old["m.q"].A)  # even after close, while the view lives
    assert _same(pl.load(target), new)
    assert temporaries(tmp_path) == []


# -- killed writers ------------------------------------------------------------------------------
SLOW_FILE_WRITER = textwrap.dedent("""
    import sys, time
    from portable_lora.io.atomic import atomic_file
    with atomic_file(sys.argv[1]) as out:
        for i in range(100000):
            out.write(b"new data " * 1000)
            out.flush()
            if i == 2:
                print("writing", flush=True)
            time.sleep(0.01)
""")

SLOW_DIRECTORY_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from portable_lora.io.atomic import atomic_directory
    with atomic_directory(sys.argv[1]) as out:
        for i in range(100000):
            (Path(out) / f"shard-{i:05d}.bin").write_bytes(b"new" * 1000)
            if i == 2:
                print("writing", flush=True)
            time.sleep(0.01)
""")


def _start_writer(script: str, target: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE,
                             env=env, text=True)
    line = child.stdout.readline()
    if line.strip() != "writing":
        child.kill()
        child.wait()
        pytest.fail(f"the writer did not start (exit {child.poll()}, said {line!r})")
    return child


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stdout.close()


def test_sigkill_mid_write_keeps_the_old_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "adapter.safetensors"
    pl.save(_adapter(seed=1), target)
    old_bytes = target.read_bytes()
    child = _start_writer(SLOW_FILE_WRITER, target)
    try:
        # while the writer lives, its temporary is its own: another write must not remove it
        assert len(temporaries(tmp_path)) == 1
        remove_stale_partials(target)
        assert len(temporaries(tmp_path)) == 1
        assert target.read_bytes() == old_bytes
    finally:
        _kill(child)
    stale = temporaries(tmp_path)
    assert len(stale) == 1 and (tmp_path / stale[0]).stat().st_size > 0  # the killed writer's leftover
    assert target.read_bytes() == old_bytes
    new = _adapter(seed=2)
    pl.save(new, target)  # the next write to the same target removes the stale temporary
    assert temporaries(tmp_path) == [] and _same(pl.load(target), new)


def test_sigkill_mid_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as out:
        (out / "config.json").write_text('{"version": "old"}')
        (out / "weights.bin").write_bytes(OLD)
    child = _start_writer(SLOW_DIRECTORY_WRITER, target)
    try:
        assert listing(target) == ["config.json", "weights.bin"]  # the half-built one is hidden
    finally:
        _kill(child)
    assert listing(target) == ["config.json", "weights.bin"]
    assert (target / "weights.bin").read_bytes() == OLD
    assert len(temporaries(tmp_path)) == 1
    with atomic_directory(target) as out:
        (out / "config.json").write_text('{"version": "new"}')
    assert listing(target) == ["config.json"] and temporaries(tmp_path) == []


def test_stale_partials_of_other_targets_are_left_alone(tmp_path):
    dead = _dead_pid()
    mine = tmp_path / f".a.{dead}.0123abcd{PARTIAL_SUFFIX}"
    mine_old = tmp_path / f".a.{dead}.0123abcd.old{PARTIAL_SUFFIX}"
    other = tmp_path / f".a.{dead}.{dead}.0123abcd{PARTIAL_SUFFIX}"  # target "a.<dead>"
    longer = tmp_path / f".a.b.{dead}.0123abcd{PARTIAL_SUFFIX}"  # target "a.b"
    unrelated = tmp_path / f".a.{dead}.notrandom{PARTIAL_SUFFIX}"
    for p in (mine, other, longer, unrelated):
        p.write_bytes(b"x")
    mine_old.mkdir()
    (mine_old / "f").write_bytes(b"x")
    remove_stale_partials(tmp_path / "a")
    assert not mine.exists() and not mine_old.exists()
    assert other.exists() and longer.exists() and unrelated.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- directories become visible all at once ---------------------------------------------------------
def _write_dir(target: Path, version: str, files: int = 3) -> None:
    with atomic_directory(target) as out:
        for i in range(files):
            (out / f"part-{i}.txt").write_text(version)


@pytest.mark.parametrize("after", [0, 1, 2])
def test_directory_write_raising_midway_keeps_the_old_one(tmp_path, after):
    target = tmp_path / "out"
    _write_dir(target, "old")
    with pytest.raises(Interrupted):
        with atomic_directory(target) as out:
            for i in range(3):
                if i == after:
                    raise Interrupted
                (out / f"part-{i}.txt").write_text("new")
                assert listing(target) == ["part-0.txt", "part-1.txt", "part-2.txt"]
                assert (target / "part-0.txt").read_text() == "old"
    assert {p.read_text() for p in target.iterdir()} == {"old"} and len(listing(target)) == 3
    assert temporaries(tmp_path) == []


def test_directory_write_raising_with_no_previous_output_leaves_nothing(tmp_path):
    with pytest.raises(Interrupted):
        with atomic_directory(tmp_path / "out") as out:
            (out / "x").write_text("half")
            raise Interrupted
    assert listing(tmp_path) == []


def test_directory_write_enospc_names_the_file_in_the_target(tmp_path, fail_after):
    target = tmp_path / "out"
    _write_dir(target, "old")
    with pytest.raises(OSError) as info:
        with atomic_directory(target) as out:
            fail_after(3, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            with atomic_file(out / "weights.safetensors") as f:
                f.write(b"x" * 10)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target / "weights.safetensors")  # not the temporary directory
    assert {p.read_text() for p in target.iterdir()} == {"old"} and len(listing(target)) == 3
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_directory_replaces_a_previous_directory_or_file(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    _write_dir(target, "old", files=5)
    _write_dir(target, "new", files=2)
    assert listing(target) == ["part-0.txt", "part-1.txt"]
    assert {p.read_text() for p in target.iterdir()} == {"new"}
    single = tmp_path / "was-a-file"
    single.write_bytes(OLD)
    _write_dir(single, "new", files=1)
    assert listing(single) == ["part-0.txt"]
    assert temporaries(tmp_path) == []


def test_two_renames_put_the_old_directory_back_if_the_second_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    _write_dir(target, "old")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new directory into place
            raise OSError(errno.EIO, "I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        _write_dir(target, "new")
    assert {p.read_text() for p in target.iterdir()} == {"old"} and len(listing(target)) == 3
    assert temporaries(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 exchange is Linux-only")
def test_a_concurrent_reader_never_sees_a_half_or_missing_directory(tmp_path):
    """Whatever directory is at the path, when a reader lists it, is complete.

    A reader already inside the previous directory when it is replaced sees that directory's
    files go as it is removed; it can tell, because the path no longer leads to it (the inode
    cannot be reused while the reader holds it open).
    """
    target = tmp_path / "out"
    names = [f"part-{i}.txt" for i in range(8)]
    _write_dir(target, "v0", files=8)
    current: list[list[str]] = []
    superseded: list[list[str]] = []
    absent: list[int] = []
    done = threading.Event()

    errors: list[BaseException] = []

    def inode_at_path() -> int | None:
        try:
            return os.stat(target).st_ino
        except FileNotFoundError:
            absent.append(1)
            return None

    def reader():
        try:
            while not done.is_set():
                try:
                    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:
                    absent.append(1)
                    continue
                try:
                    listed = sorted(os.listdir(fd))
                    at_path = os.fstat(fd).st_ino == inode_at_path()
                finally:
                    os.close(fd)
                (current if at_path else superseded).append(listed)
        except BaseException as exc:  # a dead reader must fail the test, not pass it
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 40):
            _write_dir(target, f"v{version}", files=8)
    finally:
        done.set()
        thread.join()
    assert not errors, errors
    assert current and all(listed == names for listed in current), [x for x in current if x != names][:3]
    assert all(set(listed) <= set(names) for listed in superseded)
    assert not absent  # the exchange leaves no moment without a directory at the path
    assert temporaries(tmp_path) == []
