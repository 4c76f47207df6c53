"""A ready-to-sample bundle: model + VAE + text encoder + config, from a run, a checkpoint or Wan.

    from resampling_forcing.pipeline import Pipeline
    pipe = Pipeline.from_pretrained("runs/tiny")
    out = pipe.generate(["a red circle moves left"], num_chunks=8, seed=0, top_k=5)

Modules: `core` (Pipeline: from_pretrained, generate, the diffusers-style __call__), `loading`
(path -> config, model and encoders; device and dtype parsing), `inputs` (init video / image ->
a clip of whole chunks), `output` (PipelineOutput, VideoFiles / save_video: mp4 + JSON sidecar). The names
below are re-exported here, the public import path.
"""
from ..checkpoint import CheckpointInfo, latest_checkpoint, resolve_checkpoint, resolve_hub_id
from ..storyboard import PipelineError, parse_storyboard, video_paths
from .core import Pipeline
from .inputs import prepare_init_video, read_image
from .loading import parse_dtype, resolve_config, resolve_device
from .output import PipelineOutput, VideoFiles, save_video

__all__ = [
    "PipelineError",
    "CheckpointInfo",
    "latest_checkpoint",
    "resolve_checkpoint",
    "resolve_hub_id",
    "resolve_config",
    "parse_dtype",
    "resolve_device",
    "prepare_init_video",
    "read_image",
    "parse_storyboard",
    "video_paths",
    "save_video",
    "VideoFiles",
    "PipelineOutput",
    "Pipeline",
]
