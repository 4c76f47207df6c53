"""Drift evaluation for bouncing-shapes videos: the generator is known, so every frame is measured.

For each video (uint8 ``[F,H,W,3]`` or float in [-1,1], see :func:`resampling_forcing.mp4.to_uint8_video`)
and its caption (parsed with :func:`~resampling_forcing.data.synthetic.parse_caption`), objects are
detected per frame (:mod:`.detect`), measured per frame and per transition and summarised per segment
of the training clip length (:mod:`.metrics`), plotted and tabulated (:mod:`.report`); the command line
(:mod:`.cli`, ``python -m resampling_forcing.eval --help``) evaluates folders of mp4 files with their
caption sidecars. :mod:`.config` holds the thresholds (:class:`EvalConfig`).
"""
from .cli import evaluate_paths, main
from .config import SCORE_KEYS, EvalConfig, EvalInputError
from .detect import Blob, detect
from .metrics import evaluate_video, mean_over_videos
from .report import plot_drift, summary_table

__all__ = ["SCORE_KEYS", "EvalConfig", "EvalInputError", "Blob", "detect", "evaluate_video", "mean_over_videos",
           "plot_drift", "summary_table", "evaluate_paths", "main"]
