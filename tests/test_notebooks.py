"""Every chapter notebook runs top to bottom, as a learner runs it: offline, on a CPU, showing its
figures inline and leaving the checkout as it found it.

The kernel inherits this process's environment (conftest points tiktoken and minigpt at the
offline copies of GPT-2's files, and pins one thread).
"""

import hashlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
HANDBOOK_FIGURES = ROOT / "chapters" / "figures"
SAVED_FIGURE = re.compile(r'FIGURES / "([^"]+\.png)"')


def folder_digest(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*"))}


def figures_shown(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    if not (ROOT / "the-verdict.txt").is_file():  # the notebooks read it where main.py does
        pytest.skip("the-verdict.txt is not in the repository root (run main.py once, or copy it there)")
    monkeypatch.delenv("MINIGPT_REFRESH_FIGURES", raising=False)  # the handbook's figures are redrawn only on purpose
    handbook_before = folder_digest(HANDBOOK_FIGURES)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors
    assert folder_digest(HANDBOOK_FIGURES) == handbook_before, "the notebook wrote into chapters/figures"
    hidden = [SAVED_FIGURE.findall(cell.source) for cell in notebook.cells
              if cell.cell_type == "code" and SAVED_FIGURE.search(cell.source) and not figures_shown(cell)]
    assert not hidden, f"figures saved but not shown in the notebook: {hidden}"
