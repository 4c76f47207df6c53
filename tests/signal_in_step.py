"""train/train.py, but process RF_SIGNAL_RANK sends itself SIGTERM in the 2nd micro-batch of the step
after RF_SIGNAL_AFTER_STEP steps (tests/test_train_launch.py: a stop within a step, on one rank)."""
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from resampling_forcing.training import Trainer  # noqa: E402

_original = Trainer.compute_loss
_calls = []


def _compute_loss(self, batch, stage, gen):
    if self.acc.process_index == int(os.environ["RF_SIGNAL_RANK"]) and self.step == int(os.environ["RF_SIGNAL_AFTER_STEP"]):
        _calls.append(self.step)
        if len(_calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    return _original(self, batch, stage, gen)


Trainer.compute_loss = _compute_loss
sys.argv = [str(REPO / "train" / "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
