"""examples/quickstart.ipynb runs top to bottom in a Jupyter kernel, as a reader would run it, so it cannot rot.

nbclient and ipykernel come with the dev extra (`pip install -e .[dev]`, which `make test` does).
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs_reads_metrics_draws_figures_and_lists_bans(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells), "commit the notebook without outputs"
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})  # the test machine is shared, as in the other tests
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 5  # accuracy, loss, active peers, CenteredClip iterations, ban timeline
    assert "final test accuracy" in text and "step  test accuracy  active peers" in text
    assert "honest peers banned: 0" in text and "(Byzantine) banned; accused by" in text
    run_dir = tmp_path / "runs" / "notebook-btard"
    assert (run_dir / "summary.json").exists() and (run_dir / "report.md").exists()
