"""The notebooks run top to bottom (they use the same public API as the CLI)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("TRD_NOTEBOOK_STEPS", "40")  # the notebooks' own default, set explicitly
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend must draw figures
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # Every plotting notebook produced at least one figure.
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"


def test_notebooks_are_generated_from_tools_script():
    assert {p.name for p in NOTEBOOKS} >= {"01_quickstart.ipynb", "02_prefix_failure_audit.ipynb", "03_pass_at_k_curves.ipynb"}
    assert os.path.exists(Path(__file__).resolve().parents[1] / "tools" / "make_notebooks.py")
