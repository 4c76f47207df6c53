"""``python -m resampling_forcing.eval ...``: the drift evaluation CLI (:func:`.cli.main`)."""
import sys

from .cli import main

sys.exit(main())
