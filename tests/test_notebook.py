"""The continuous-decoding notebook runs top to bottom with the shipped default model."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "continuous_decoding.ipynb"


def test_notebook_executes_without_errors(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Any cell that raises makes execute() raise CellExecutionError, failing the test.
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "features (33, 41, 25," in printed
    assert "ArSSR     PSNR" in printed and "tricubic  PSNR" in printed
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4
