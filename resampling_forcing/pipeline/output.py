"""Output: `PipelineOutput` (what `Pipeline.__call__` returns) and `VideoFiles` / `save_video`, the mp4 +
JSON sidecar (+ routing selections) writer of sample/sample.py (streamed) and PipelineOutput.save."""
from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from ..sampler import SampleResult
from ..storyboard import PipelineError, video_paths

__all__ = ["save_video", "PipelineOutput", "VideoFiles"]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


class VideoFiles:
    """One video's files, written as one atomic group (io.AtomicGroup): the routing selections (.selection.npy,
    with `with_selection`), the JSON sidecar (same name, .json) and the mp4, renamed in that order at
    `commit`, the mp4 last: an mp4 on disk always has its JSON. Frames go into the mp4 as they come
    (`write`, uint8 [F, H, W, 3] pieces: sample/sample.py streams a rollout's chunks, so the video is never
    held whole); `abort` (or any error in `commit`) leaves no file."""

    def __init__(self, path: Union[str, Path], fps: float, with_selection: bool = False):
        from ..io import AtomicGroup
        from ..mp4 import Mp4Writer

        self.path = Path(path)
        names = [self.path.with_suffix(".json"), self.path]
        if with_selection:
            names.insert(0, self.path.with_suffix(".selection.npy"))
        self.with_selection = with_selection
        self._group = AtomicGroup(names)
        try:
            self._mp4 = Mp4Writer(self._group.tmps[-1], fps)
        except BaseException:
            self._group.abort()
            raise

    def write(self, frames) -> None:
        """Append one video's frames [F, H, W, 3] uint8 (a tensor or an array) to its mp4."""
        with self._named():
            self._mp4.write(frames.numpy() if isinstance(frames, torch.Tensor) else frames)

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        """Failures while writing the group, named by the video, not a temporary: a full disk as
        OSError(ENOSPC); an encoder that died, or a temporary removed by another process, as OutputError."""
        from ..io import OutputError, is_no_space

        try:
            yield
        except OSError as e:
            if is_no_space(e):
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path)) from None
            gone = [t.name for t in self._group.tmps if not t.exists()]
            if gone:
                raise OutputError(f"{self.path}: its temporary file {gone[0]} was removed while being written "
                                  "(another process writing the same outputs?); nothing was written") from None
            raise
        except OutputError:
            raise
        except RuntimeError as e:  # Mp4Writer: the encoder died before finishing the file
            raise OutputError(f"{self.path}: {str(e).split(': ', 1)[-1]}; nothing was written") from None

    def commit(self, meta: dict, selection: Optional[np.ndarray] = None) -> None:
        import json

        try:
            meta = dict(meta)
            if self.with_selection and selection is None:
                raise ValueError(f"{self.path}: the selections were announced but not given")
            with self._named():
                self._group.check()
                if self.with_selection:
                    meta["selection"] = self.path.with_suffix(".selection.npy").name
                    with open(self._group.tmps[0], "wb") as f:
                        np.save(f, selection)
                self._group.tmps[-2].write_text(json.dumps(_jsonable(meta), indent=2) + "\n", encoding="utf-8")
                self._mp4.close()
                self._group.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Kill the encoder and remove every temporary (a no-op after the commit)."""
        try:
            self._mp4.abort()
        finally:
            self._group.abort()


def save_video(path: Union[str, Path], video, meta: dict, fps: float, selection: Optional[np.ndarray] = None) -> None:
    """Write an mp4 (uint8 [F, H, W, 3]) with its JSON sidecar and optionally the routing selections as one
    atomic group (VideoFiles, all at once). The writer of PipelineOutput.save."""
    files = VideoFiles(path, fps, with_selection=selection is not None)
    try:
        files.write(video)
    except BaseException:
        files.abort()
        raise
    files.commit(meta, selection)


@dataclass
class PipelineOutput:
    """What `Pipeline.__call__` returns: `frames` uint8 [B, F, H, W, 3] (decoded history + new
    frames), the underlying SampleResult, and `save(path)` (mp4 + JSON per prompt)."""

    frames: torch.Tensor
    result: SampleResult
    fps: float
    seed: int
    indices: list
    pipeline: dict

    @property
    def latents(self) -> torch.Tensor:
        return self.result.latents

    def metadata(self, b: int = 0, path: Union[str, Path, None] = None) -> dict:
        """The JSON sidecar of sample b (what sample/sample.py writes)."""
        res = self.result
        neg = res.negative_prompt[b] if isinstance(res.negative_prompt, list) else res.negative_prompt
        board = res.storyboard
        if board is not None:
            board = [dict(chunk=e["chunk"], prompt=e["prompt"] if isinstance(e["prompt"], str) else e["prompt"][b])
                     for e in board]
        return dict(
            prompt=res.prompts[b] if res.prompts else None, negative_prompt=neg, seed=self.seed,
            sample_index=self.indices[b], noise_seed_rule="sampler.sample_seed(seed, sample_index)",
            video=Path(path).name if path is not None else None,
            frames=int(self.frames.shape[1]) if self.frames is not None else res.num_frames, fps=self.fps,
            history_frames=res.history_frames, history_chunks=res.history_chunks,
            num_chunks=int(res.timings.get("generated_chunks", 0)),
            storyboard=board, switch_cache=res.switch_cache if board is not None else None,
            init_video=res.init_video, sampling=res.options, pipeline=self.pipeline, timings=dict(res.timings),
        )

    def save(self, path: Union[str, Path], extra: Optional[dict] = None) -> list[Path]:
        """Write sample b to path (one prompt) or to path_000_<prompt>.mp4, ... (several; a
        directory: DIR/000_<prompt>.mp4); each with its JSON. Returns the mp4 paths."""
        if not isinstance(path, (str, Path)) or not str(path).strip():
            raise PipelineError(f"save: path must be a non-empty str or Path (a .mp4 file or a folder), got {path!r}")
        prompts = self.result.prompts or [f"sample_{i}" for i in range(self.frames.shape[0])]
        paths = video_paths(path, prompts)
        for b, p in enumerate(paths):
            self.save_one(b, p, extra)
        return paths

    def save_one(self, b: int, path: Union[str, Path], extra: Optional[dict] = None) -> dict:
        if self.frames is not None and (isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.frames.shape[0]):
            raise PipelineError(f"save_one: sample index b={b!r} not in [0, {self.frames.shape[0]})")
        if extra is not None and not isinstance(extra, dict):
            raise PipelineError(f"save: extra must be a dict (added to the JSON), got {type(extra).__name__}")
        if self.frames is None:
            raise PipelineError("nothing to save: the video went to video_sink, not into the result" if
                                self.result.streamed else "nothing to save: the rollout was not decoded (decode=False)")
        meta = self.metadata(b, path)
        meta.update(extra or {})
        sel = self.result.selection
        save_video(path, self.frames[b], meta, self.fps, None if sel is None else sel[b])  # this sample's picks
        return meta
