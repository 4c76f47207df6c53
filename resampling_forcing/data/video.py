"""Video clips from a manifest: decode, resample in time, resize + center-crop, normalise.

Manifest
- JSONL (one object per line), JSON (a list of objects) or CSV (header row). Keys/columns: ``path``
  and ``caption`` (required), ``split`` (optional; rows without one count as "train").
- ``path`` is relative to the manifest's folder (absolute paths are kept).
- A missing manifest, one without the required columns, or one with no usable video raises a
  one-line ``ValueError`` naming the file and the fix.

Clips (``VideoClipDataset``)
- Decoded with decord; PyAV is the fallback when decord is not installed or fails on a file, and
  reads the files decord gets wrong (MP4 edit lists, rotated videos). Backends: data/decode.py.
  A file is read as a player shows it: an edit list's hidden frames are left out, the display
  rotation (portrait phone videos) is applied and non-square pixels are resized to their shape.
- Time: the clip is resampled to ``fps`` by timestamp: output frame k (time ``(start + k) / fps``
  after the first shown frame) shows the source frame on screen at that time, the last one whose
  presentation timestamp is <= t (``floor(t * src_fps)`` at a constant frame rate; variable-rate
  phone / screen recordings by their timestamps); ``fps=None`` keeps the source frames. The clip
  length ``num_frames`` is a parameter (Wan's VAE wants ``1 + 4k``).
- Start: random (``random_start=True``: drawn from ``numpy.random.default_rng(mix_seed(seed, epoch, index))``,
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

import csv
import io
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..seeds import mix_seed
from .decode import BadVideo, UsePyAV, VideoInfo, _backends, _DecordBackend, error_line, _PyAVBackend  # noqa: F401

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
    try:  # bytes: a CSV's quoted "\r\n" stays; -sig: a byte-order mark (Excel's CSV export) is dropped
        text = mpath.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{mpath}: cannot read manifest ({e}); {_FIX}") from None
    if suffix in (".jsonl", ".json"):  # JSON has no raw CR inside strings: CR / CRLF ends a line
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if suffix == ".jsonl":  # "\n" only: str.splitlines also splits at U+2028, U+0085, ... inside captions
        for ln, line in enumerate(text.split("\n"), 1):
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
        reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted newlines kept, U+2028 is no row end
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
# time and space transforms
# ----------------------------------------------------------------------------------------------
_TS_TOL = 5e-4  # s: a timestamp this close after an output time counts as on screen (a 1 ms time base rounds by 0.5 ms)


def available_frames(num_src: int, src_fps: float, fps: float | None, times=None) -> int:
    """How many output frames at ``fps`` fit in a source of ``num_src`` frames at ``src_fps``: output
    frame k shows the source frame on screen at k / fps (``frame_indices``), which exists while
    k / fps < num_src / src_fps (the last source frame is on screen until num_src / src_fps).
    ``times`` (``VideoInfo.times``, a variable frame rate): the source lasts until its last timestamp
    plus the interval before it (the last frame is shown as long as the one before)."""
    if times is not None and fps is not None and len(times) > 1:
        end = times[-1] + max(times[-1] - times[-2], 0.0)
        return max(1, int(math.ceil(end * fps - 1e-6)))
    if fps is None or src_fps <= 0 or abs(fps - src_fps) < 1e-6:
        return num_src
    return int(math.ceil(num_src * fps / src_fps - 1e-6))


def frame_indices(start: int, num_frames: int, num_src: int, src_fps: float, fps: float | None,
                  times=None) -> list[int]:
    """Source frame index shown at each output timestamp ``(start + k) / fps``: ``floor(t * src_fps)``
    at a constant rate, or with ``times`` (a variable rate) the last frame whose timestamp is <= t."""
    if times is not None and fps is not None:
        t = (start + np.arange(num_frames)) / fps + _TS_TOL
        idx = np.searchsorted(np.asarray(times), t, side="right") - 1
        return np.clip(idx, 0, num_src - 1).tolist()
    if fps is None or src_fps <= 0 or abs(fps - src_fps) < 1e-6:
        return [min(start + k, num_src - 1) for k in range(num_frames)]
    return [min(int(math.floor((start + k) * src_fps / fps + 1e-6)), num_src - 1) for k in range(num_frames)]


def resize_center_crop(frames, height: int, width: int, sar: float = 1.0) -> torch.Tensor:
    """Frames -> float32 ``[3, F, height, width]`` in [-1, 1]: scale to cover (aspect kept; bilinear,
    antialiased when shrinking), then centre crop. ``frames``: uint8 ``[F, H, W, 3]`` (array or
    tensor; normalised after resizing) or float ``[3, F, H, W]`` in [-1, 1]. ``sar``: the pixels'
    aspect ratio (width / height; a video with non-square pixels is shown ``sar`` times wider than
    stored), so the aspect kept is the displayed one. The one resize of the training clips and of the
    sampler's init videos / images (pipeline.inputs)."""
    x = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    is_uint8 = x.dtype == torch.uint8
    x = x.permute(0, 3, 1, 2).float() if is_uint8 else x.permute(1, 0, 2, 3)  # [F, 3, H, W]
    _, _, h, w = x.shape
    scale = max(height / h, width / (w * sar))  # of the height; the width scales by scale * sar
    nh, nw = max(height, int(round(h * scale))), max(width, int(round(w * sar * scale)))
    if (nh, nw) != (h, w):
        shrink = min(scale, scale * sar) < 1
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=shrink)
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
    def _with_backend(self, i: int, read):
        """``read(backend, path)`` with the first backend that reads row ``i``'s file: a decoder's failure
        tries the next one, a file decord declines (edit list, rotation) goes to PyAV (also with
        backend='decord'); too_small / too_short are properties of the file and raised at once."""
        path = self.rows[i]["path"]
        queue, err = list(self._backends), None
        known = self._info.get(i)
        if known is not None and known.backend == _PyAVBackend.name and not isinstance(queue[0], _PyAVBackend):
            queue.insert(0, _PyAVBackend())  # decord declined or failed on this file before: not again per load
        for be in queue:  # grows while iterating when decord declines
            try:
                return read(be, path)
            except UsePyAV:
                if not any(isinstance(b, _PyAVBackend) for b in queue):
                    queue.append(_PyAVBackend())
            except BadVideo as e:
                if e.reason in ("too_small", "too_short"):
                    raise
                err = err or e
        raise err or BadVideo("unreadable", "no backend read it")

    def _probe(self, i: int) -> VideoInfo:
        if i not in self._info:
            info = self._with_backend(i, lambda be, path: be.info(path))
            self._check(info)
            self._info[i] = info
        return self._info[i]

    def _check(self, info: VideoInfo) -> None:
        shown_w = info.width * info.sar  # the displayed width (non-square pixels)
        scale = max(self.height / info.height, self.width / shown_w)
        if scale > self.max_upscale + 1e-9:
            raise BadVideo(
                "too_small",
                f"{round(shown_w)}x{info.height} needs {scale:.2f}x upscaling for {self.width}x{self.height} (max_upscale={self.max_upscale})",
            )
        avail = available_frames(info.num_frames, info.fps, self.fps, info.times)
        if avail < self.num_frames:
            raise BadVideo("too_short", f"{avail} frames at {self.fps or info.fps:g} fps < {self.num_frames}")

    def _start(self, i: int, avail: int) -> int:
        last = avail - self.num_frames
        if self.random_start:
            rng = np.random.default_rng(mix_seed(self.seed, self.epoch, i))
            return int(rng.integers(0, last + 1))
        return max(0, min(self.start_frame, last))

    def _load(self, i: int) -> dict:
        def read(be, path):
            handle = be.open(path)
            info = self._info.get(i)
            if info is None or info.backend != be.name:  # indices are per backend
                info = be.info(path, handle)
            self._check(info)
            avail = available_frames(info.num_frames, info.fps, self.fps, info.times)
            start = self._start(i, avail)
            idx = frame_indices(start, self.num_frames, info.num_frames, info.fps, self.fps, info.times)
            return info, be.frames(path, idx, handle)

        info, frames = self._with_backend(i, read)
        self._info[i] = info  # the next epoch reads no header again
        if frames.ndim != 4 or frames.shape[0] != self.num_frames or frames.shape[-1] != 3:
            raise BadVideo("corrupt", f"decoded frames have shape {tuple(frames.shape)}")
        video = resize_center_crop(frames, self.height, self.width, info.sar)
        path = self.rows[i]["path"]
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
            self._mark_bad(i, BadVideo("corrupt", error_line(e)))
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
