"""notebooks/preview.ipynb runs headlessly end to end on a tiny random checkpoint."""
import ast
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import save_checkpoint_for_tests

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "preview.ipynb"


def test_preview_notebook_executes(tmp_path, monkeypatch):
    run = save_checkpoint_for_tests(tmp_path / "run")
    monkeypatch.setenv("RF_CHECKPOINT", str(run))
    monkeypatch.setenv("RF_NUM_CHUNKS", "4")
    monkeypatch.setenv("RF_STEPS", "2")
    monkeypatch.setenv("RF_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("RF_ABLATION_CLIPS", "2")
    monkeypatch.setenv("RF_ABLATION_SEGMENTS", "3")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # the videos were embedded, the grid and the heatmap rendered
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(html) == 2 and len(images) >= 2
    assert (tmp_path / "out" / "dense.mp4").stat().st_size > 0
    text = "".join(o.get("text", "") for o in outputs)
    assert "quality per" in text and "chunk 3:" in text
    # the prompt-switching cell: a storyboard rollout per cache mode, the sheet written
    assert "storyboard: [{'chunk': 0" in text and "recache" in text and " | " in text
    assert (tmp_path / "out" / "switch.png").stat().st_size > 0
    # the shipped ablation arms under the sliding window: a fidelity row of 3 segments per arm, the sheet
    rows = [line for line in text.splitlines() if "object fidelity per segment:" in line]
    assert [r.split()[0] for r in rows] == ["tf", "ar_0.6"] and all(len(ast.literal_eval(r.split(":", 1)[1])) == 3 for r in rows)
    assert "sliding window: RoutingSpec(mode='window'" in text
    assert (tmp_path / "out" / "tf_vs_resampling.png").stat().st_size > 0
    # no numpy warnings printed into the notebook (the heatmap printed "Mean of empty slice")
    assert "Mean of empty slice" not in text and "RuntimeWarning" not in text, text
