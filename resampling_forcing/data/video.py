"""Video clips from a manifest: decode, resample in time, resize + center-crop, normalise.

Manifest
- JSONL (one object per line), JSON (a list of objects) or CSV (header row). Keys/columns: ``path``
  and ``caption`` (required), ``split`` (optional; rows without one count as "train").
- ``path`` is relative to the manifest's folder (absolute paths are kept).
- A missing manifest, one without the required columns, or one with no usable video raises a
  one-line ``ValueError`` naming the file and the fix.

Clips (``VideoClipDataset``)
- Decoded with decord; PyAV is the fallback when decord is not installed or fails on a file.
- Time: the clip is resampled to ``fps`` by timestamp: output frame k (time ``(start + k) / fps``)
  shows the source frame on screen at that time (``floor(t * src_fps)``); ``fps=None`` keeps the
  source rate. The clip length ``num_frames`` is a parameter (Wan's VAE wants ``1 + 4k``).
- Start: random (``random_start=True``: drawn from ``numpy.random.default_rng([seed, epoch, index])``,
  so it is reproducible and independent of worker assignment; call ``set_epoch`` each epoch) or
  fixed (``start_frame``, counted in output frames, clamped to the last possible start).
- Space: resize so the short side fits (bilinear, antialiased), then center-crop to
  ``(height, width)``. A video that would need upscaling by more than ``max_upscale`` (default 1.25,
  i.e. at most 25% upscaling; ``1.0`` = never upscale) is skipped as ``too_small``.
- Output: ``item["video"]`` float32 ``[3, F, H, W]`` in ``[-1, 1]``, plus ``caption``, ``path`` and
  ``index`` (the manifest row actually used).

Bad input never stops a run. A file that is missing, empty (0 bytes), unreadable (cannot be opened),
corrupt (fails while decoding), too short (fewer than ``num_frames`` frames at ``fps``) or too small
is logged with ONE warning line (logger ``resampling_forcing.data``), remembered, and counted
(``dataset.bad_files``: reason -> count; ``dataset.summary()``: a one-line report).
``dataset[i]`` on a bad file falls through to the next good index (i+1, i+2, ... wrapping around),
so the result is deterministic. ``dataset.try_get(i)`` returns ``None`` instead (no fall-through;
used by latent precomputation so each good video is encoded exactly once, and by the training data,
data/loader.py, which drops bad rows from the epoch rather than sampling a neighbour twice).

Probing: existence and size are checked up front (cheap). Opening/decoding is lazy by default
(first access), because probing a large manifest is slow; ``probe=True`` opens every file up front
(header only: frame count, fps, size) so unreadable/too-short/too-small files are known before
training, and raises if none is usable. Decoding errors are caught either way. With DataLoader
workers each worker's copy is ``quiet`` (records, does not log) and ``note_bad`` records and logs in
the main process what a worker found (data/loader.py does this), so every file is warned about and
counted once, also when a worker's prefetched batch is discarded.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

logger = logging.getLogger("resampling_forcing.data")

REQUIRED_KEYS = ("path", "caption")
_FIX = "expected a .jsonl/.json/.csv manifest with keys/columns path, caption[, split] (paths relative to the manifest)"


# ----------------------------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------------------------
def read_manifest(manifest: str | os.PathLike, split: str | None = None) -> list[dict]:
    """Rows ``{"path": absolute str, "caption": str, "split": str}`` of a manifest.

    ``split``: keep only rows of that split (rows without a split are "train"); None keeps all.
    """
    mpath = Path(manifest)
    if not mpath.is_file():
        raise ValueError(f"{mpath}: manifest not found; {_FIX}")
    suffix = mpath.suffix.lower()
    rows: list[dict] = []
    try:
        text = mpath.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Excel's CSV export) is dropped
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath}: cannot read manifest ({e}); {_FIX}") from None
    if suffix == ".jsonl":
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{mpath}:{ln}: not valid JSON ({e.msg}); {_FIX}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{mpath}:{ln}: each line must be a JSON object; {_FIX}")
            rows.append(row)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{mpath}: not valid JSON ({e.msg}); {_FIX}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{mpath}: a .json manifest must be a list of objects; {_FIX}")
        rows = data
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [k for k in REQUIRED_KEYS if k not in header]
        if missing:
            raise ValueError(f"{mpath}: CSV header lacks column(s) {', '.join(missing)} (has {header}); {_FIX}")
        rows = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
    else:
        raise ValueError(f"{mpath}: unknown manifest type {suffix!r}; {_FIX}")
    out = []
    for n, row in enumerate(rows, 1):
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"{mpath}: row {n} lacks key(s) {', '.join(missing)}; {_FIX}")
        p = str(row["path"] or "").strip()
        if not p:
            raise ValueError(f"{mpath}: row {n} has an empty path; {_FIX}")
        full = Path(p) if os.path.isabs(p) else (mpath.parent / p)
        sp = str(row.get("split") or "train").strip() or "train"
        out.append({"path": str(full), "caption": "" if row["caption"] is None else str(row["caption"]), "split": sp,
                    "row": n})
    if not out:
        raise ValueError(f"{mpath}: manifest has no rows; {_FIX}")
    if split is not None:
        kept = [r for r in out if r["split"] == split]
        if not kept:
            have = sorted({r["split"] for r in out})
            raise ValueError(f"{mpath}: no rows with split={split!r} (splits present: {have}); training reads split=train rows (or a manifest without a split column), train/precompute.py --split picks another")
        out = kept
    return out


# ----------------------------------------------------------------------------------------------
# decoding backends
# ----------------------------------------------------------------------------------------------
class BadVideo(Exception):
    """A file that cannot give a clip; ``reason`` is one of the summary keys."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


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


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = _NATIVE_PREFIX.sub("", lines[0]) if lines else ""
    return f"{type(e).__name__}: {msg}"[:200]


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
            raise BadVideo("unreadable", _first_line(e)) from None
        return vr

    def info(self, path: str, handle=None) -> VideoInfo:
        vr = handle if handle is not None else self.open(path)
        n = len(vr)
        if n <= 0:
            raise BadVideo("no_frames", "0 frames")
        try:
            fps = float(vr.get_avg_fps())
            h, w = vr[0].shape[:2]  # decord exposes no size without decoding a frame
        except Exception as e:
            raise BadVideo("corrupt", _first_line(e)) from None
        return VideoInfo(n, fps, int(h), int(w))

    def frames(self, path: str, indices: list[int], handle=None) -> np.ndarray:
        vr = handle if handle is not None else self.open(path)
        try:
            uniq = sorted(set(indices))
            batch = vr.get_batch(uniq).asnumpy()
        except Exception as e:
            raise BadVideo("corrupt", _first_line(e)) from None
        pos = {j: k for k, j in enumerate(uniq)}
        return batch[[pos[i] for i in indices]]


class _PyAVBackend:
    name = "pyav"

    def open(self, path: str):
        return None

    def info(self, path: str, handle=None) -> VideoInfo:
        import av

        try:
            with av.open(path) as c:
                if not c.streams.video:
                    raise BadVideo("unreadable", "no video stream")
                s = c.streams.video[0]
                fps = float(s.average_rate or s.guessed_rate or s.base_rate or 0)
                n = int(s.frames or 0)
                h, w = int(s.codec_context.height), int(s.codec_context.width)
                if n <= 0:  # container does not say: count by demuxing
                    n = sum(1 for p in c.demux(s) if p.size)
        except BadVideo:
            raise
        except Exception as e:
            raise BadVideo("unreadable", _first_line(e)) from None
        if n <= 0:
            raise BadVideo("no_frames", "0 frames")
        if fps <= 0:
            raise BadVideo("unreadable", "unknown frame rate")
        return VideoInfo(n, fps, h, w)

    def frames(self, path: str, indices: list[int], handle=None) -> np.ndarray:
        import av

        need = set(indices)
        last = max(indices)
        got: dict[int, np.ndarray] = {}
        try:
            with av.open(path) as c:
                for k, fr in enumerate(c.decode(video=0)):
                    if k in need:
                        got[k] = fr.to_ndarray(format="rgb24")
                    if k >= last:
                        break
        except Exception as e:
            raise BadVideo("corrupt", _first_line(e)) from None
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


# ----------------------------------------------------------------------------------------------
# time and space transforms
# ----------------------------------------------------------------------------------------------
def available_frames(num_src: int, src_fps: float, fps: float | None) -> int:
    """How many output frames at ``fps`` fit in a source of ``num_src`` frames at ``src_fps``: output
    frame k shows the source frame on screen at k / fps (``frame_indices``), which exists while
    k / fps < num_src / src_fps (the last source frame is on screen until num_src / src_fps)."""
    if fps is None or src_fps <= 0 or abs(fps - src_fps) < 1e-6:
        return num_src
    return int(math.ceil(num_src * fps / src_fps - 1e-6))


def frame_indices(start: int, num_frames: int, num_src: int, src_fps: float, fps: float | None) -> list[int]:
    """Source frame index shown at each output timestamp ``(start + k) / fps``."""
    if fps is None or src_fps <= 0 or abs(fps - src_fps) < 1e-6:
        return [min(start + k, num_src - 1) for k in range(num_frames)]
    return [min(int(math.floor((start + k) * src_fps / fps + 1e-6)), num_src - 1) for k in range(num_frames)]


def resize_center_crop(frames, height: int, width: int) -> torch.Tensor:
    """Frames -> float32 ``[3, F, height, width]`` in [-1, 1]: scale to cover (aspect kept; bilinear,
    antialiased when shrinking), then centre crop. ``frames``: uint8 ``[F, H, W, 3]`` (array or
    tensor; normalised after resizing) or float ``[3, F, H, W]`` in [-1, 1]. The one resize of the
    training clips and of the sampler's init videos / images (pipeline.inputs)."""
    x = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    is_uint8 = x.dtype == torch.uint8
    x = x.permute(0, 3, 1, 2).float() if is_uint8 else x.permute(1, 0, 2, 3)  # [F, 3, H, W]
    _, _, h, w = x.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, int(round(h * scale))), max(width, int(round(w * scale)))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    if is_uint8:
        x = x / 127.5 - 1.0
    return x.clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


# ----------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------
class VideoClipDataset(Dataset):
    """Clips ``[3, num_frames, height, width]`` in [-1, 1] from the videos of a manifest.

    See the module docstring for resampling, cropping, bad-file handling and probing.
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        num_frames: int,
        height: int,
        width: int,
        fps: float | None = None,
        split: str | None = None,
        seed: int = 0,
        random_start: bool = True,
        start_frame: int = 0,
        max_upscale: float = 1.25,
        backend: str = "auto",
        probe: bool = False,
    ):
        if num_frames < 1 or height < 1 or width < 1:
            raise ValueError(f"num_frames, height, width must be >= 1; got {num_frames}, {height}, {width}")
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be > 0 or None, got {fps}")
        self.manifest = Path(manifest)
        self.rows = read_manifest(self.manifest, split=split)
        self.num_frames = int(num_frames)
        self.height, self.width = int(height), int(width)
        self.fps = None if fps is None else float(fps)
        self.split = split
        self.seed = int(seed)
        self.random_start = bool(random_start)
        self.start_frame = int(start_frame)
        self.max_upscale = float(max_upscale)
        self.backend = backend
        self._backends = _backends(backend)
        self.epoch = 0
        self.quiet = False  # a DataLoader worker's copy: record bad files, the main process logs them
        self._bad: dict[int, str] = {}
        self._bad_detail: dict[int, str] = {}
        self._info: dict[int, VideoInfo] = {}
        for i, r in enumerate(self.rows):  # cheap up-front checks
            if "\x00" in r["path"]:  # os.stat would raise ValueError and stop everything
                self._mark_bad(i, BadVideo("bad_path", f"manifest row {r.get('row', i + 1)}: the path contains a null byte"))
                continue
            try:
                st = os.stat(r["path"])
            except OSError:
                self._mark_bad(i, BadVideo("missing", "no such file"))
                continue
            if st.st_size == 0:
                self._mark_bad(i, BadVideo("empty", "0 bytes"))
        if probe:
            for i in range(len(self.rows)):
                if i not in self._bad:
                    try:
                        self._probe(i)
                    except BadVideo as e:
                        self._mark_bad(i, e)
        if len(self._bad) == len(self.rows):
            raise ValueError(
                f"{self.manifest}: no usable video ({self._counts_text()}); check the paths (relative to the manifest) and the files"
            )

    # -- bookkeeping ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def bad_files(self) -> dict[str, int]:
        return dict(Counter(self._bad.values()))

    def bad_reason(self, i: int) -> str | None:
        """Why row ``i`` was skipped (None when it is not known to be bad)."""
        return self._bad.get(i)

    @property
    def num_bad(self) -> int:
        return len(self._bad)

    def _counts_text(self) -> str:
        c = self.bad_files
        return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) if c else "none bad"

    def summary(self) -> str:
        n, b = len(self.rows), len(self._bad)
        tail = f" ({self._counts_text()})" if b else ""
        return f"{self.manifest.name}: {n} videos listed, {b} skipped{tail}"

    def bad_detail(self, i: int) -> str:
        return self._bad_detail.get(i, "")

    def note_bad(self, i: int, reason: str, detail: str = "") -> None:
        """Record (and warn about, once) row ``i`` found bad by a DataLoader worker's quiet copy of this
        data set, so that it is counted once and later copies skip it silently."""
        self._mark_bad(i, BadVideo(reason, detail))

    def _mark_bad(self, i: int, err: BadVideo) -> None:
        if i in self._bad:
            return
        self._bad[i] = err.reason
        self._bad_detail[i] = err.detail or ""
        if not self.quiet:
            detail = f" ({err.detail})" if err.detail else ""
            logger.warning("skipping video %s: %s%s", self.rows[i]["path"].replace("\x00", "\\0"), err.reason, detail)

    # -- decoding ---------------------------------------------------------------------------
    def _probe(self, i: int) -> VideoInfo:
        if i in self._info:
            return self._info[i]
        path = self.rows[i]["path"]
        err = None
        for be in self._backends:
            try:
                info = be.info(path)
                break
            except BadVideo as e:
                err = err or e
        else:
            raise err
        self._check(info)
        self._info[i] = info
        return info

    def _check(self, info: VideoInfo) -> None:
        scale = max(self.height / info.height, self.width / info.width)
        if scale > self.max_upscale + 1e-9:
            raise BadVideo(
                "too_small",
                f"{info.width}x{info.height} needs {scale:.2f}x upscaling for {self.width}x{self.height} (max_upscale={self.max_upscale})",
            )
        avail = available_frames(info.num_frames, info.fps, self.fps)
        if avail < self.num_frames:
            raise BadVideo("too_short", f"{avail} frames at {self.fps or info.fps:g} fps < {self.num_frames}")

    def _start(self, i: int, avail: int) -> int:
        last = avail - self.num_frames
        if self.random_start:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            return int(rng.integers(0, last + 1))
        return max(0, min(self.start_frame, last))

    def _load(self, i: int) -> dict:
        path = self.rows[i]["path"]
        err: BadVideo | None = None
        for be in self._backends:
            try:
                handle = be.open(path)
                info = be.info(path, handle)
                self._check(info)
                avail = available_frames(info.num_frames, info.fps, self.fps)
                idx = frame_indices(self._start(i, avail), self.num_frames, info.num_frames, info.fps, self.fps)
                frames = be.frames(path, idx, handle)
                break
            except BadVideo as e:
                if e.reason in ("too_small", "too_short"):
                    raise  # a property of the file, not of the decoder
                err = err or e
        else:
            raise err
        if frames.ndim != 4 or frames.shape[0] != self.num_frames or frames.shape[-1] != 3:
            raise BadVideo("corrupt", f"decoded frames have shape {tuple(frames.shape)}")
        video = resize_center_crop(frames, self.height, self.width)
        return {"video": video, "caption": self.rows[i]["caption"], "path": path, "index": i}

    def try_get(self, i: int) -> dict | None:
        """The clip of row ``i``, or None when that file is bad (it is then logged and counted)."""
        if i < 0:
            i += len(self.rows)
        if not 0 <= i < len(self.rows):
            raise IndexError(i)
        if i in self._bad:
            return None
        try:
            return self._load(i)
        except BadVideo as e:
            self._mark_bad(i, e)
        except Exception as e:  # anything unexpected from a decoder: never stop the run
            self._mark_bad(i, BadVideo("corrupt", _first_line(e)))
        return None

    def __getitem__(self, i: int) -> dict:
        n = len(self.rows)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        for k in range(n):
            item = self.try_get((i + k) % n)
            if item is not None:
                return item
        raise ValueError(f"{self.manifest}: no usable video ({self._counts_text()}); check the paths and the files")
