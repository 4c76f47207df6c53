"""Output: `PipelineOutput` (what `Pipeline.__call__` returns) and `save_video`, the mp4 + JSON
sidecar (+ routing selections) writer of sample/sample.py and PipelineOutput.save."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..sampler import SampleResult
from ..storyboard import PipelineError, video_paths

__all__ = ["save_video", "PipelineOutput"]


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


def save_video(path: Union[str, Path], video, meta: dict, fps: float, selection: Optional[np.ndarray] = None) -> None:
    """Write an mp4 (uint8 [F, H, W, 3]) with its JSON sidecar (same name, .json) and optionally the
    routing selections (.selection.npy) as one atomic group, the mp4 last: an mp4 on disk always
    has its JSON. The writer of sample/sample.py and PipelineOutput.save."""
    import json

    from ..io import atomic_group, write_mp4

    path = Path(path)
    group = [path.with_suffix(".json"), path]
    meta = dict(meta)
    if selection is not None:
        meta["selection"] = path.with_suffix(".selection.npy").name
        group.insert(0, path.with_suffix(".selection.npy"))
    video = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    with atomic_group(group) as tmps:
        if selection is not None:
            with open(tmps[0], "wb") as f:
                np.save(f, selection)
        tmps[-2].write_text(json.dumps(_jsonable(meta), indent=2) + "\n", encoding="utf-8")
        write_mp4(tmps[-1], video, fps=fps, atomic=False)


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
            frames=int(self.frames.shape[1]) if self.frames is not None else 0, fps=self.fps,
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
            raise PipelineError("nothing to save: the rollout was not decoded (decode=False)")
        meta = self.metadata(b, path)
        meta.update(extra or {})
        sel = self.result.selection
        save_video(path, self.frames[b], meta, self.fps, None if sel is None else sel[b])  # this sample's picks
        return meta
