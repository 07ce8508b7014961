"""The continuous-decoding notebook runs top to bottom with the shipped default model."""

import re
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
    rows = [(m["name"], float(m["psnr"]), float(m["ssim"])) for m in re.finditer(
        r"^(?P<name>\S.*?)\s+PSNR\s+(?P<psnr>[\d.]+) dB\s+SSIM (?P<ssim>[\d.]+)", printed, re.M)]
    assert [name for name, _, _ in rows] == ["tricubic", "ArSSR, network only", "ArSSR", "tricubic", "shipped", "adapted"]
    simulated, thick = ({name: (p, s) for name, p, s in part} for part in (rows[:3], rows[3:]))
    assert simulated["ArSSR"][0] > simulated["tricubic"][0] and simulated["ArSSR"][1] > simulated["tricubic"][1]
    # the thick-slice scan: adapted above tricubic and the shipped model on both
    assert all(thick["adapted"][k] > max(thick["tricubic"][k], thick["shipped"][k]) for k in (0, 1)), thick
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5
