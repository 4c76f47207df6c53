"""Small, dependable file IO: atomic writes, locks, JSON (videos: mp4.py; PNG sheets and figures: figures.py).

Every writer here is atomic: it writes to a hidden temporary name in the destination folder and
then ``os.replace``-s it onto the final name, so a crash or an exception never leaves a half file
under the final name (and never leaves the temporary behind either); mp4.Mp4Writer, which writes the
path it is given, is handed a temporary of :func:`atomic_path` / :class:`AtomicGroup`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_group",
    "clean_stale_temps",
    "clean_folder_temps",
    "folder_lock",
    "file_mode",
    "current_umask",
    "probe_writable_dir",
    "is_no_space",
    "atomic_write_json",
    "AtomicGroup",
    "OutputError",
]


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------
def _read_umask() -> int:
    """The process umask without changing it (Linux: /proc/self/status); else set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the only portable way (a brief window, once per call)
    os.umask(mask)
    return mask


def current_umask() -> int:
    return _read_umask()


def file_mode() -> int:
    """Mode of a new file under the current umask (what ``open(path, "w")`` would give)."""
    return 0o666 & ~_read_umask()


def is_no_space(e: BaseException) -> bool:
    """True for a disk-full error: ENOSPC/EDQUOT, or the same wrapped by torch/safetensors/ffmpeg."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(s in str(e) for s in ("No space left", "Disk quota exceeded", "ENOSPC"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder as ``path``; on success move it onto ``path``.

    The temporary name keeps the final suffix (tools such as ffmpeg pick the container from it)
    and starts with a dot. On any exception the temporary file is removed and the final name is
    left untouched (an older complete file stays; nothing new appears). The final file gets the
    mode a plain ``open(path, "w")`` would give (0o666 minus the umask), not mkstemp's 0600, so
    colleagues on a shared machine can read results when the umask allows it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # a writer may have replaced the file: set the mode on what is there
            os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


class OutputError(RuntimeError):
    """An output that could not be written for a reason outside this process's input (a temporary removed by
    another process, an encoder that died); the message names the output and says nothing was written."""


class AtomicGroup:
    """Temporary paths (`tmps`) for files that belong together (a video and its JSON); `commit()` renames
    them in order, the LAST one being the marker. The old marker is removed before the first rename, so
    after a crash at any moment a marker on disk always has the rest of its group (``sample.py``: every
    mp4 has its JSON). `abort()` removes every temporary (a no-op after the commit). For a group whose
    files are written over a long time (sample.py streams its mp4s while the rollout runs); otherwise
    :func:`atomic_group`. Leftover temporaries of a killed process: :func:`clean_stale_temps`."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.finals = [Path(p) for p in paths]
        self.tmps: list[Path] = []
        self.done = False
        try:
            for p in self.finals:
                p.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=f".tmp{p.suffix}", dir=p.parent)
                os.close(fd)
                self.tmps.append(Path(tmp))
        except BaseException:
            self.abort()
            raise

    def check(self) -> None:
        """OutputError when a temporary is gone (another process writing the same outputs cleaned it up)."""
        for t, p in zip(self.tmps, self.finals):
            if not t.exists():
                raise OutputError(f"{p}: its temporary file {t.name} was removed while being written "
                                  "(another process writing the same outputs?); nothing was written")

    def commit(self) -> None:
        try:
            self.check()
            mode = file_mode()
            for t in self.tmps:
                os.chmod(t, mode)
            self.finals[-1].unlink(missing_ok=True)
            for t, p in zip(self.tmps, self.finals):
                os.replace(t, p)
        except BaseException:
            self.abort()
            raise
        self.done = True

    def abort(self) -> None:
        if self.done:
            return
        for t in self.tmps:
            with contextlib.suppress(FileNotFoundError):
                t.unlink()


@contextlib.contextmanager
def atomic_group(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """:class:`AtomicGroup` as a context: yields the temporary paths, commits on success, removes every
    temporary on an exception."""
    group = AtomicGroup(paths)
    try:
        yield group.tmps
    except BaseException:
        group.abort()
        raise
    group.commit()


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries that a killed writer of ``path`` (any suffix) left next to it."""
    path = Path(path)
    return _remove_temps(path.parent, glob_escape(path.stem))


def clean_folder_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove every temporary of :func:`atomic_path` in ``folder`` (not below it). Only for a caller that
    knows no other writer is at work there, e.g. under :func:`folder_lock`."""
    return _remove_temps(Path(folder), "*")


def _remove_temps(folder: Path, stem_glob: str) -> list[Path]:
    """Remove ``folder/.STEM.XXXXXXXX.tmp*`` (atomic_path's names) for the stems ``stem_glob`` matches."""
    removed = []
    if folder.is_dir():
        for t in folder.glob(f".{stem_glob}.{'?' * 8}.tmp*"):
            with contextlib.suppress(OSError):
                t.unlink()
                removed.append(t)
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str, waiting: str) -> Iterator[bool]:
    """Hold an exclusive ``fcntl.flock`` on ``folder/name`` (the folder is created), waiting for it if
    another process holds it (``waiting`` is logged once then); yields True. The kernel drops it when the
    holder exits in any way, so a killed holder never leaves a stale lock; the file itself stays. Yields
    False (unlocked, with a warning where it matters) when no lock can be had: a read-only folder without
    the file, a file of another user that cannot be opened, a file system without locks (NFS without its
    lock service). training_utils.RunLock is the other lock: non-blocking, a held run folder is an error."""
    import errno
    import fcntl

    log = logging.getLogger(__name__)
    path = Path(folder) / name
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):  # read-only: another user's lock file (flock needs no write)
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, 0o666)
            break
        except OSError:
            continue
    if fd is None:  # nothing can be written here (read-only data): nothing to guard
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            log.warning("%s; waiting for it to finish", waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("%s: no file locks here (%s); going on without one", path, e.strerror)
            locked = False
        yield locked
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def glob_escape(text: str) -> str:
    import glob

    return glob.escape(text)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def probe_writable_dir(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be created or written (one line), or None when it can.

    Really tries (os.access says yes to root even on /proc): an existing folder gets a temporary
    file, a missing one a temporary sub-folder in its first existing ancestor; both are removed,
    so nothing is left behind either way."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    try:
        if probe == folder:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write_test.")
            os.close(fd)
            os.remove(tmp)
        else:
            os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".write_test."))
    except OSError as e:
        what = "write in" if probe == folder else f"create folders in {probe} for"
        return f"cannot {what} {folder} ({e.strerror or type(e).__name__})"
    return None
