"""Small, dependable file IO: atomic writes, mp4 in/out (PNG contact sheets and figures: figures.py).

Every writer here is atomic: it writes to a hidden temporary name in the destination folder and
then ``os.replace``-s it onto the final name, so a crash or an exception never leaves a half file
under the final name (and never leaves the temporary behind either). The one exception, ``Mp4Writer``,
writes the path it is given: callers give it a temporary of :func:`atomic_path` / :class:`AtomicGroup`.

Video frames
- ``uint8`` arrays/tensors shaped ``[F, H, W, 3]`` are taken as they are.
- float arrays/tensors are taken as values in ``[-1, 1]`` (the model/VAE convention), laid out either
  ``[3, F, H, W]`` (channel first, what the datasets produce) or ``[F, H, W, 3]``; a leading batch
  dimension of size 1 is dropped. See :func:`to_uint8_video`.

mp4 files are H.264 (libx264), written by imageio-ffmpeg's ffmpeg binary (ffmpeg.py starts it) at their
exact size, small frames (32x32, 48x80, ...) included, and read by PyAV; read-back shape equals the
input shape. The pixel
format is ``yuv420p`` (plays everywhere) when height and width are even, ``yuv444p`` otherwise (4:2:0
cannot represent odd sizes).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

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
    "to_uint8_video",
    "write_mp4",
    "read_mp4",
    "iter_mp4",
    "VideoReadError",
    "Mp4Writer",
    "mp4_frames",
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


# ----------------------------------------------------------------------------------------------
# frame conversion
# ----------------------------------------------------------------------------------------------
def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
                x = x.float()
            return x.numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


def to_uint8_video(video) -> np.ndarray:
    """Convert a video to a C-contiguous ``uint8 [F, H, W, 3]`` array.

    uint8 input must already be ``[F, H, W, 3]``. Float input is in ``[-1, 1]`` and either
    ``[3, F, H, W]`` or ``[F, H, W, 3]`` (``[1, ...]`` batch of one is accepted too).
    """
    x = _to_numpy(video)
    if x.ndim == 5 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 4:
        raise ValueError(f"expected a video [F,H,W,3] (uint8) or [3,F,H,W] (float); got shape {x.shape}")
    if x.dtype == np.uint8:
        if x.shape[-1] != 3:
            raise ValueError(f"uint8 video must be [F,H,W,3]; got shape {x.shape}")
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"unsupported video dtype {x.dtype}: use uint8 [F,H,W,3] or float in [-1,1]")
    if x.shape[0] == 3 and x.shape[-1] != 3:
        x = np.moveaxis(x, 0, -1)  # [3,F,H,W] -> [F,H,W,3]
    elif x.shape[-1] != 3:
        raise ValueError(f"float video must be [3,F,H,W] or [F,H,W,3]; got shape {x.shape}")
    x = np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    x = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------------------------
# mp4
# ----------------------------------------------------------------------------------------------
MAX_FPS = 1000.0  # exclusive: ffmpeg tags 1000 fps as "1k", which reads back as 0; beyond is a typo
MIN_FPS = 1e-3  # inclusive: ffmpeg writes no file below 1e-4 (a frame every 1000 s is already a slide show)


def fps_problem(fps) -> str | None:
    """Why `fps` cannot be an mp4 frame rate ("must be a number in [0.001, 1000)"), or None: the one rule of
    write_mp4, which the sampling CLI and the Pipeline check before a rollout."""
    if (isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating))
            or not MIN_FPS <= fps < MAX_FPS):
        return f"must be a number in [{MIN_FPS:g}, {MAX_FPS:g}) (got {fps!r})"
    return None


class Mp4Writer:
    """An H.264 mp4 written piece by piece: ``write(frames)`` any number of times (pieces of one frame size,
    as :func:`to_uint8_video` takes them), then ``close()``; as a context manager it closes on success and
    kills ffmpeg on an error. Writes ``path`` itself: wrap it in :func:`atomic_path` / :func:`atomic_group`
    for an all-or-nothing file. ffmpeg starts at the first piece (its frame size). ``close()`` checks that
    the file is a complete mp4 (an encoder killed or out of disk space leaves none); a failing encoder
    raises ``OSError(ENOSPC)`` naming ``path`` when its folder has no space left, else ``RuntimeError``
    (a dead ffmpeg with its exit code), and the writer then refuses further calls.
    ``quality``: imageio-ffmpeg scale 0..10 (maps to libx264 ``crf = 51*(1-q/10)``; 9 -> crf 5,
    visually lossless; 10 would be crf 0, the lossless profile many players refuse).
    ``pix_fmt``: output pixel format; default yuv420p for even sizes, yuv444p for odd ones."""

    def __init__(self, path: str | os.PathLike, fps: float = 16, quality: int = 9, pix_fmt: str | None = None):
        problem = fps_problem(fps)
        if problem:
            raise ValueError(f"{path}: fps {problem}")
        if (isinstance(quality, bool) or not isinstance(quality, (int, float, np.integer, np.floating))
                or not 0 <= quality <= 10):
            raise ValueError(f"{path}: quality must be a number in [0, 10] (got {quality!r})")
        self.path, self.fps, self.quality, self.pix_fmt = Path(path), fps, quality, pix_fmt
        self.frames = 0
        self._size: tuple[int, int] | None = None
        self._ffmpeg = None
        self._failed: str | None = None  # why an encoder step failed: no call after it writes

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"{self.path}: the encoder failed earlier ({self._failed}); this writer writes nothing more")

    def write(self, frames) -> None:
        """Append frames: uint8 [F, H, W, 3], or float in [-1, 1] as [3, F, H, W] or [F, H, W, 3] (to_uint8_video)."""
        from .ffmpeg import Encoder

        self._check_usable()
        video = to_uint8_video(frames)
        num, h, w, _ = video.shape
        if self._size is None:
            if num == 0:
                return
            pix_fmt = self.pix_fmt or ("yuv420p" if (h % 2 == 0 and w % 2 == 0) else "yuv444p")
            with self._encoding():
                self._ffmpeg = Encoder(self.path, (h, w), self.fps, self.quality, pix_fmt)
            self._size = (h, w)
        elif (h, w) != self._size:
            raise ValueError(f"{self.path}: frames of {h}x{w} after frames of {self._size[0]}x{self._size[1]}")
        with self._encoding():
            for frame in video:
                self._ffmpeg.write(frame)
        self.frames += num

    def close(self) -> Path:
        """Finish the file; refuses a video without frames and a file that is not a complete mp4."""
        self._check_usable()
        ffmpeg = self._ffmpeg
        if ffmpeg is None:
            raise ValueError(f"{self.path}: cannot write a video with 0 frames")
        with self._encoding():
            code = ffmpeg.close()  # (interrupted, it kills ffmpeg; abort() then finds it dead)
            self._ffmpeg = None
            frames = mp4_frames(self.path)
            if frames != self.frames:
                got = "no complete file" if frames is None else f"{frames} of the {self.frames} frames"
                raise RuntimeError(f"{self.path}: ffmpeg wrote {got} (stopped or killed?)")
            if code != 0:
                raise RuntimeError(f"{self.path}: ffmpeg exited with code {code}")
        return self.path

    def abort(self) -> int | None:
        """Kill ffmpeg now (the file is then to be discarded): no wait for its backlog. Its exit code (None
        when none was running)."""
        ffmpeg, self._ffmpeg = self._ffmpeg, None
        return None if ffmpeg is None else ffmpeg.kill()

    @contextlib.contextmanager
    def _encoding(self) -> Iterator[None]:
        """An ffmpeg step: its failure on a full disk as OSError(ENOSPC) naming the file (ffmpeg reports it
        as a broken pipe or an unfinished file), other failures as they are. Either way the encoder is
        killed: a writer whose step failed writes nothing more (no ffmpeg left waiting on its pipe)."""
        import errno
        import shutil

        try:
            yield
        except (OSError, RuntimeError) as e:
            code = self.abort()
            full = is_no_space(e)
            if not full:
                with contextlib.suppress(OSError):
                    full = shutil.disk_usage(self.path.parent).free < 2**20
            if full:
                self._failed = "no space left"
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path)) from None
            if isinstance(e, BrokenPipeError):  # ffmpeg died (killed, or failed on this file): say so, with its code
                self._failed = f"ffmpeg stopped, exit code {code}"
                raise RuntimeError(f"{self.path}: ffmpeg stopped (exit code {code}) before the video was finished "
                                   "(killed?)") from None
            self._failed = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise
        except BaseException:  # Ctrl+C mid-write: ffmpeg goes too
            self.abort()
            raise

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _boxes(f, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the mp4 boxes in [start, end) of file `f`; ValueError when a box
    runs past `end` or is malformed."""
    pos = start
    while pos < end:
        f.seek(pos)
        head = f.read(16)
        if len(head) < 8:
            raise ValueError("truncated box header")
        n, kind, body = int.from_bytes(head[:4], "big"), head[4:8], pos + 8
        if n == 1:  # 64-bit size
            if len(head) < 16:
                raise ValueError("truncated box header")
            n, body = int.from_bytes(head[8:16], "big"), pos + 16
        elif n == 0:  # to the end
            n = end - pos
        if n < body - pos or pos + n > end:
            raise ValueError("box past its end")
        yield kind, body, pos + n
        pos += n


def mp4_frames(path: str | os.PathLike) -> int | None:
    """Frames of the video track of an mp4 (its sample table's count), or None when the file is not a
    complete mp4: its top-level boxes do not run exactly to its end, or the index ("moov") is missing, as a
    killed or starved encoder leaves it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            top = {k: (b, e) for k, b, e in _boxes(f, 0, size)}
            if b"moov" not in top:
                return None
            for kind, b, e in _boxes(f, *top[b"moov"]):
                if kind != b"trak":
                    continue
                inner = {k: (b2, e2) for k, b2, e2 in _boxes(f, b, e)}
                for step in (b"mdia", b"minf"):
                    inner = {k: (b2, e2) for k, b2, e2 in _boxes(f, *inner[step])} if step in inner else {}
                if b"vmhd" in inner and b"stbl" in inner:  # the video track's sample table
                    table = {k: b2 for k, b2, _ in _boxes(f, *inner[b"stbl"])}
                    if b"stsz" in table:
                        f.seek(table[b"stsz"] + 8)  # version/flags, sample size, then the count
                        return int.from_bytes(f.read(4), "big")
    except (OSError, ValueError):
        return None
    return None


def write_mp4(
    path: str | os.PathLike,
    frames,
    fps: float = 16,
    quality: int = 9,
    pix_fmt: str | None = None,
    atomic: bool = True,
) -> Path:
    """Write ``frames`` to an H.264 mp4 at ``path`` atomically and return the path.

    ``frames``: uint8 ``[F,H,W,3]`` or float ``[3,F,H,W]`` / ``[F,H,W,3]`` in ``[-1,1]``.
    ``quality``, ``pix_fmt``: as :class:`Mp4Writer`, the one encoder.
    ``atomic=False``: write ``path`` directly (it is already a temporary name, e.g. of :func:`atomic_group`).
    """
    video = to_uint8_video(frames)
    if video.shape[0] == 0:
        raise ValueError(f"{path}: cannot write a video with 0 frames")
    problem = fps_problem(fps)
    if problem:
        raise ValueError(f"{path}: fps {problem}")
    path = Path(path)
    with (atomic_path(path) if atomic else contextlib.nullcontext(path)) as tmp:
        with Mp4Writer(tmp, fps, quality, pix_fmt) as writer:
            writer.write(video)
    return path


class VideoReadError(ValueError):
    """A video file that cannot be read (missing, empty, undecodable): the message names the file."""


def iter_mp4(path: str | os.PathLike, block: int = 32) -> tuple[float, Iterator[np.ndarray]]:
    """(fps, blocks of uint8 [<= block, H, W, 3] RGB frames, upright by the file's display matrix): a video
    read block by block, in the memory of one block whatever its length (read_mp4 joins them).
    ``VideoReadError`` naming the file for a file that cannot be opened, now; for one that fails later, when
    the failing block is read. Decoded in this process by PyAV (the training clips' decoder, data/decode.py):
    no ffmpeg child, so a reader in a threaded program (a notebook) cannot hang in fork (see ffmpeg.py).
    8-bit videos give ffmpeg's own pixels; deeper ones (10-bit) go through PyAV's default conversion to
    rgb24, a few levels from ffmpeg's on average. A damaged packet is skipped with a warning."""
    import av

    from .data.decode import orientation

    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r}: need an int >= 1")
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: empty video file (0 bytes)")

    def failed(e: BaseException) -> VideoReadError:
        return VideoReadError(f"{path}: cannot decode video ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0]})")

    try:  # the header now (a bad file fails at once); the container is opened again for the frames
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    except Exception as e:  # PyAV's errors are OSError / ValueError subclasses named by FFmpeg
        raise failed(e) from e

    def blocks() -> Iterator[np.ndarray]:
        frames, any_frame, damaged = [], False, 0
        try:
            with av.open(str(path)) as container:
                for packet in container.demux(container.streams.video[0]):
                    try:
                        decoded = packet.decode()
                    except av.error.InvalidDataError:  # a damaged packet: skipped, as ffmpeg's own reader does
                        damaged += 1
                        continue
                    for fr in decoded:
                        frames.append(orientation(fr).apply(fr.to_ndarray(format="rgb24")))
                        if len(frames) == block:
                            any_frame = True
                            yield np.ascontiguousarray(np.stack(frames))
                            frames = []
        except Exception as e:  # noqa: BLE001 - a decoder failure mid-file
            raise failed(e) from e
        if damaged:
            logging.getLogger(__name__).warning("%s: %d damaged packet(s) skipped", path, damaged)
        if frames:
            yield np.ascontiguousarray(np.stack(frames))
        elif not any_frame:
            raise VideoReadError(f"{path}: video has no decodable frames")

    return fps, blocks()


def read_mp4(path: str | os.PathLike, with_fps: bool = False):
    """Read every frame of a video file as ``uint8 [F, H, W, 3]`` (RGB): iter_mp4's blocks, joined.

    With ``with_fps=True`` return ``(frames, fps)``. Raises ``VideoReadError`` (a ``ValueError``) naming the
    file for a missing, empty or undecodable file.
    """
    fps, blocks = iter_mp4(path, block=256)
    video = np.concatenate(list(blocks))
    return (video, fps) if with_fps else video
