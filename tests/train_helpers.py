"""Shared setup of the training tests: a very small config on a small synthetic set."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_YAML = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic data folder shared by the tests of one module (generated on first use)."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture
def fresh_accelerate_state(one_thread):
    """Forget accelerate's process-wide state after an in-process training test (the next one builds its
    own Accelerator); single-threaded torch while it runs. Use with pytest.mark.usefixtures or autouse."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def small_overrides(run_dir, synthetic_dir, steps_tf: int = 3, steps_rf: int = 3, **extra) -> list[str]:
    """configs/tiny.yaml shrunk to ~50K parameters and 16x16 8-frame clips (4 chunks of 2 frames)."""
    kv = {
        "train.run_dir": str(run_dir),
        "data.synthetic_dir": str(synthetic_dir),
        "data.synthetic_videos": 24,
        "data.num_frames": 8,
        "data.height": 16,
        "data.width": 16,
        "model.dim": 32,
        "model.ffn_dim": 64,
        "model.num_heads": 2,
        "model.num_layers": 2,
        "model.freq_dim": 32,
        "model.prediction": "velocity",
        "train.batch_size": 2,
        "train.warmup_steps": 0,
        "train.lr": 3e-3,
        "train.progress": False,
        "train.save_every": 3,
        "train.stages": f"[{{name: tf, steps: {steps_tf}}}, {{name: rf, objective: resampling, steps: {steps_rf}}}]",
    }
    kv.update(extra)
    out = []
    for k, v in kv.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        out.append(f"{k}={v}")
    return out


def read_log(run_dir) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def child_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    return env
