"""What the drift evaluation is configured with (thresholds of detection and metrics) and its error."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data.synthetic import BACKGROUND, PALETTE, SHAPES, SPEED_RANGE

SCORE_KEYS = ("object_fidelity", "identity_consistency", "motion_score", "background_clean")  # quality = their mean


@dataclass
class EvalConfig:
    palette: dict = field(default_factory=lambda: dict(PALETTE))
    background: tuple = BACKGROUND
    shapes: tuple = SHAPES
    color_tol: float = 50.0  # RGB distance of a pixel to the background->colour mixing line
    bg_tol: float = 40.0  # RGB distance for a pixel to count as clean background
    min_area_frac: float = 0.5  # of the smallest object the generator draws
    min_fill: float = 0.35  # blob area / bounding-box area
    max_area_factor: float = 3.0  # blobs bigger than this x the largest object are clutter, not objects
    shape_min_area: int = 20  # classify shapes of blobs at least this big (pixels)
    max_jump_frac: float = 0.15  # identity: max move per frame, fraction of min(H, W)
    physics_tol_frac: float = 0.035  # physics: max prediction error, fraction of min(H, W) (>= 1 px)
    min_speed_frac: float = 0.5 * SPEED_RANGE[0]  # "moves": fraction of min(H, W) per frame


class EvalInputError(ValueError):
    """Bad input for the evaluation (reported as one line by the CLI)."""


def check_segment_frames(segment_frames: int | None) -> None:
    """Segments are ``segment_frames`` frames long (the training clip length); None = the whole video."""
    if segment_frames is not None and segment_frames < 1:
        raise EvalInputError(f"segment_frames (--segment-frames) must be >= 1 (the training clip length in frames), got {segment_frames}")
