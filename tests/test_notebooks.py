"""Every chapter notebook runs top to bottom, as a learner runs it: offline, on a CPU.

The kernel inherits this process's environment (conftest points tiktoken and minigpt at the
offline copies of GPT-2's files, and pins one thread).
"""

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture
def figures_kept(request):
    """A notebook redraws its chapter's figures (chNN-*.png); put the committed ones back after the
    test, so that running the tests leaves the checkout as it was."""
    prefix = request.node.callspec.params["path"].stem.split("-")[0]  # "ch05"
    folder = ROOT / "chapters" / "figures"
    before = {path: path.read_bytes() for path in folder.glob(f"{prefix}-*.png")}
    yield
    for path in folder.glob(f"{prefix}-*.png"):
        if path not in before:
            path.unlink()
    for path, content in before.items():
        path.write_bytes(content)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path, figures_kept):
    if not (ROOT / "the-verdict.txt").is_file():  # the notebooks read it where main.py does
        pytest.skip("the-verdict.txt is not in the repository root (run main.py once, or copy it there)")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors
