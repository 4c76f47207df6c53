"""Video files: mp4 out (H.264 through an ffmpeg process, ffmpeg.py), any video in (PyAV), frame conversion.

Video frames
- ``uint8`` arrays/tensors shaped ``[F, H, W, 3]`` are taken as they are.
- float arrays/tensors are taken as values in ``[-1, 1]`` (the model/VAE convention), laid out either
  ``[3, F, H, W]`` (channel first, what the datasets produce) or ``[F, H, W, 3]``; a leading batch
  dimension of size 1 is dropped. See :func:`to_uint8_video`.

mp4 files are H.264 (libx264), written by imageio-ffmpeg's ffmpeg binary (ffmpeg.py starts it) at their
exact size, small frames (32x32, 48x80, ...) included, and read by PyAV; read-back shape equals the
input shape. The pixel format is ``yuv420p`` (plays everywhere) when height and width are even,
``yuv444p`` otherwise (4:2:0 cannot represent odd sizes). Files appear whole or not at all: write_mp4
writes through io.atomic_path; Mp4Writer writes the path it is given (a temporary of io.atomic_path /
io.AtomicGroup).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .io import atomic_path, is_no_space

__all__ = ["to_uint8_video", "fps_problem", "MAX_FPS", "MIN_FPS", "Mp4Writer", "mp4_frames", "write_mp4",
           "VideoReadError", "iter_mp4", "read_mp4"]


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
    kills ffmpeg on an error. Writes ``path`` itself: wrap it in :func:`io.atomic_path` / :func:`io.atomic_group`
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
    ``atomic=False``: write ``path`` directly (it is already a temporary name, e.g. of :func:`io.atomic_group`).
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

    from .data.decode import error_line, orientation

    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r}: need an int >= 1")
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: empty video file (0 bytes)")

    def failed(e: BaseException) -> VideoReadError:
        return VideoReadError(f"{path}: cannot decode video ({error_line(e)})")

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
