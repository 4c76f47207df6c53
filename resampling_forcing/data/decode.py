"""Decoder backends for the training clips (data/video.py): decord, and PyAV as the fallback.

A backend gives, per file, a :class:`VideoInfo` (``info``) and the decoded frames at given
indices (``frames``: uint8 ``[F, H, W, 3]``, RGB). Both backends describe a file as a player
shows it, so that they return the same frames for the same clip:
- frames: only those a player shows. An MP4 edit list (a file cut with ``ffmpeg -ss X -c copy``)
  hides the frames before its start; they are not counted and have no index.
- time: each frame's presentation timestamp. ``VideoInfo.times`` is None for a constant frame
  rate (frame k at ``k / fps``, to within a tenth of a frame), else the timestamps of a variable
  frame rate file (seconds, the first shown frame at 0).
- orientation: the display matrix (portrait phone videos store landscape pixels plus a rotation; a
  front camera's may add a mirror) is applied to the frames as ffmpeg's player does (:func:`orientation`),
  and ``height``/``width`` are those of the frames as shown.
  ``sar`` is the pixel aspect ratio (non-square pixels), which the resize honours.

decord cannot seek edit-list files consistently and fails on 90/270 degree rotated ones (its
frame buffer has the stored size); it declines edit lists and all rotated files
(:class:`UsePyAV`), and the data set reads them with PyAV, also with ``backend='decord'``.
Failures raise :class:`BadVideo` with a one-line reason.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import numpy as np


class BadVideo(Exception):
    """A file that cannot give a clip; ``reason`` is one of the summary keys."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class UsePyAV(BadVideo):
    """decord declines a file it would read wrongly (edit list, rotation): read it with PyAV."""

    def __init__(self, detail: str):
        super().__init__("unreadable", f"decord: {detail}")


@dataclass
class VideoInfo:
    num_frames: int  # frames a player shows (those an MP4 edit list cuts off are not counted)
    fps: float  # the container's average rate
    height: int  # size of the decoded frames, rotation applied
    width: int
    times: np.ndarray | None = None  # variable rate: presentation times (s, first 0); None: frame k at k / fps
    sar: float = 1.0  # sample (pixel) aspect ratio of the decoded frames, width / height, rotation applied
    backend: str = ""  # the backend that made it (its indices are that backend's)


_decord = None
_decord_checked = False


def _get_decord():
    global _decord, _decord_checked
    if not _decord_checked:
        _decord_checked = True
        try:
            import decord

            with contextlib.suppress(Exception):
                decord.logging.set_level(decord.logging.QUIET)
            _decord = decord
        except Exception:  # not installed (e.g. aarch64) or broken
            _decord = None
    return _decord


@contextlib.contextmanager
def _quiet_fd2():
    """Silence native stderr (decord prints 'ERROR opening' itself) for the duration."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


_NATIVE_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")


def error_line(e: BaseException) -> str:
    """A decoder's exception as one short line ("InvalidDataError: Invalid data found when processing input"):
    an OSError's or PyAV error's reason without its errno and file name (the caller names the file)."""
    reason = getattr(e, "strerror", None)
    if isinstance(reason, str) and reason.strip():
        msg = reason.strip()
    else:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        msg = _NATIVE_PREFIX.sub("", lines[0]) if lines else ""
    return f"{type(e).__name__}: {msg}"[:200]


def _uneven_times(times, fps: float) -> np.ndarray | None:
    """The timestamps (s, first at 0) when the frames are not evenly spaced at ``fps``; None when they
    are (within a tenth of a frame: time-base rounding), so that a constant-rate file is indexed as
    ``floor(t * fps)`` exactly as before timestamps were read."""
    t = np.asarray(times, dtype=np.float64)
    t = t - t[0]
    if len(t) < 2 or fps <= 0 or np.abs(t - np.arange(len(t)) / fps).max() <= 0.1 / fps:
        return None
    return t


@dataclass(frozen=True)
class Orientation:
    """How a decoded frame is shown: ``k`` quarter turns counter-clockwise (np.rot90), then rows flipped
    (``vflip``), then columns (``hflip``). ``turned``: height and width swap."""

    k: int = 0
    vflip: bool = False
    hflip: bool = False

    @property
    def turned(self) -> bool:
        return self.k % 2 == 1

    @property
    def upright(self) -> bool:
        return self == Orientation()

    def apply(self, image: np.ndarray) -> np.ndarray:
        """[H, W, C] as stored -> as shown (a view)."""
        x = np.rot90(image, self.k)
        if self.vflip:
            x = x[::-1]
        return x[:, ::-1] if self.hflip else x


def orientation(frame) -> Orientation:
    """The Orientation ffmpeg's player gives ``frame`` (fftools' autorotate, from the frame's display
    matrix): the rotations by quarter turns and the mirrored ones (a phone's front camera); a rotation by
    another angle is rounded to quarter turns. Upright when the frame carries no display matrix."""
    import math

    m = None
    with contextlib.suppress(AttributeError):  # a PyAV without frame side data: the rotation alone
        sd = frame.side_data.get("DISPLAYMATRIX")  # (iterating the container changed in PyAV 18.1.1; get did not)
        if sd is not None and len(bytes(sd)) >= 36:  # 9 int32: 16.16 fixed point, 2.30 for the last column
            m = np.frombuffer(bytes(sd), dtype=np.int32)[:9].astype(np.float64) / 65536.0
    if m is None:
        return Orientation(int(round((getattr(frame, "rotation", 0) or 0) / 90)) % 4)
    s0, s1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if s0 == 0 or s1 == 0:
        return Orientation()
    theta = round(math.degrees(math.atan2(m[1] / s1, m[0] / s0)))  # ffmpeg's get_rotation, clockwise
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return Orientation(1, vflip=True) if m[3] > 0 else Orientation(3)  # transpose=cclock_flip / clock
    if abs(theta - 180) < 1:
        vflip, hflip = bool(m[4] < 0), bool(m[0] < 0)
        return Orientation(2) if vflip and hflip else Orientation(0, vflip=vflip, hflip=hflip)  # both: a half turn
    if abs(theta - 270) < 1:
        return Orientation(3, vflip=True) if m[3] < 0 else Orientation(1)  # transpose=clock_flip / cclock
    if abs(theta) < 1:
        return Orientation(0, vflip=bool(m[4] < 0))
    return Orientation(int(round(-theta / 90)) % 4)


def _pyav_display(path: str) -> tuple[Orientation, float]:
    """(orientation, pixel aspect) of a file as PyAV reads them; (upright, 1.0) when PyAV cannot tell.
    The rotation is known only from a decoded frame (PyAV exposes no stream display matrix)."""
    try:
        import av

        with av.open(path) as c:
            s = c.streams.video[0]
            sar = float(s.sample_aspect_ratio or s.codec_context.sample_aspect_ratio or 1) or 1.0
            for fr in c.decode(s):
                return orientation(fr), sar
    except Exception:
        pass
    return Orientation(), 1.0


def _turned(o: Orientation, h: int, w: int, sar: float) -> tuple[int, int, float]:
    """Size and pixel aspect as shown."""
    return (w, h, 1.0 / sar) if o.turned else (h, w, sar)


class _DecordBackend:
    name = "decord"

    def __init__(self, threads: int = 1):
        self.threads = threads

    def open(self, path: str):
        d = _get_decord()
        try:
            with _quiet_fd2():
                vr = d.VideoReader(path, ctx=d.cpu(0), num_threads=self.threads)
        except Exception as e:
            raise BadVideo("unreadable", error_line(e)) from None
        return vr

    def info(self, path: str, handle=None) -> VideoInfo:
        vr = handle if handle is not None else self.open(path)
        n = len(vr)
        if n <= 0:
            raise BadVideo("no_frames", "0 frames")
        try:
            fps = float(vr.get_avg_fps())
            ts = np.asarray(vr.get_frame_timestamp(list(range(n))), dtype=np.float64)[:, 0]
        except Exception as e:
            raise BadVideo("corrupt", error_line(e)) from None
        if ts[0] < -1e-3:  # frames before an edit list's start: decord counts them and seeks inconsistently
            raise UsePyAV("MP4 edit list")
        if np.any(np.diff(ts) < 0):
            raise UsePyAV("timestamps out of order")
        shown, sar = _pyav_display(path)
        if not shown.upright:
            raise UsePyAV("rotated or mirrored video")
        try:
            h, w = vr[0].shape[:2]  # decord exposes no size without decoding a frame
        except Exception as e:
            raise BadVideo("corrupt", error_line(e)) from None
        return VideoInfo(n, fps, int(h), int(w), _uneven_times(ts, fps), sar, self.name)

    def frames(self, path: str, indices: list[int], handle=None) -> np.ndarray:
        vr = handle if handle is not None else self.open(path)
        try:
            uniq = sorted(set(indices))
            batch = vr.get_batch(uniq).asnumpy()
        except Exception as e:
            raise BadVideo("corrupt", error_line(e)) from None
        pos = {j: k for k, j in enumerate(uniq)}
        return batch[[pos[i] for i in indices]]


class _PyAVBackend:
    """Frame k is the k-th frame the decoder outputs (presentation order; an edit list's hidden frames
    are dropped by the decoder), so ``info`` counts the demuxed packets that are not discarded
    (``stream.frames`` counts the hidden ones too)."""

    name = "pyav"

    def open(self, path: str):
        return None

    def info(self, path: str, handle=None) -> VideoInfo:
        import av

        try:
            c = av.open(path)
        except Exception as e:
            raise BadVideo("unreadable", error_line(e)) from None
        with c:
            if not c.streams.video:
                raise BadVideo("unreadable", "no video stream")
            s = c.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or s.base_rate or 0)
            sar = float(s.sample_aspect_ratio or s.codec_context.sample_aspect_ratio or 1) or 1.0
            pts, n, first = [], 0, None
            try:
                for p in c.demux(s):
                    if first is None:  # the first shown frame: size and rotation (hidden ones are dropped)
                        first = next(iter(p.decode()), None)
                    if p.size and not getattr(p, "is_discard", False):
                        n += 1
                        pts.append(p.pts)
            except Exception as e:
                raise BadVideo("corrupt", error_line(e)) from None
            tb = s.time_base
        if n <= 0:
            raise BadVideo("no_frames", "0 frames")
        if fps <= 0:
            raise BadVideo("unreadable", "unknown frame rate")
        if first is None:
            raise BadVideo("corrupt", "no frame decodes")
        times = None
        if tb and None not in pts:  # else no timestamps (e.g. a raw stream): constant rate
            times = _uneven_times([float(t * tb) for t in sorted(pts)], fps)
        h, w, sar = _turned(orientation(first), int(first.height), int(first.width), sar)
        return VideoInfo(n, fps, h, w, times, sar, self.name)

    def frames(self, path: str, indices: list[int], handle=None) -> np.ndarray:
        import av

        need = set(indices)
        last = max(indices)
        got: dict[int, np.ndarray] = {}
        try:
            with av.open(path) as c:
                for k, fr in enumerate(c.decode(video=0)):
                    if k in need:
                        got[k] = orientation(fr).apply(fr.to_ndarray(format="rgb24"))
                    if k >= last:
                        break
        except Exception as e:
            raise BadVideo("corrupt", error_line(e)) from None
        if len(got) < len(need):
            raise BadVideo("corrupt", f"decoded only up to frame {max(got) if got else -1} of {last}")
        return np.stack([got[i] for i in indices])


def _backends(backend: str) -> list:
    if backend == "decord":
        if _get_decord() is None:
            raise ValueError("backend='decord' but decord is not importable; use backend='auto' or 'pyav'")
        return [_DecordBackend()]
    if backend == "pyav":
        return [_PyAVBackend()]
    if backend == "auto":
        return ([_DecordBackend()] if _get_decord() is not None else []) + [_PyAVBackend()]
    raise ValueError(f"unknown video backend {backend!r}; use auto, decord or pyav")
