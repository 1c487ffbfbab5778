"""Every notebook in notebooks/ runs top to bottom without an error (nbclient, a real kernel).

The kernel is this interpreter's ``python3`` kernel spec (its ``python`` is mapped to
``sys.executable`` by jupyter_client); when no spec exists, one is installed into this
environment with ``python -m ipykernel install --sys-prefix``. A first injected cell checks
that the kernel really runs this interpreter. Notebooks are stored without outputs.
"""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT = 600  # per cell, in seconds of wall time: the CI machine is shared


def kernel_name() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True,
                       capture_output=True)
    return "python3"


def test_all_notebooks_are_found():
    assert {p.name for p in NOTEBOOKS} >= {"demo.ipynb", "attention.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # saved clean: no outputs, no execution counts
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} was saved with outputs"

    # The kernel inherits this environment: offline, no wandb, one thread per tiny model, and its
    # temporary folders (tempfile.mkdtemp in the notebooks) inside this test's tmp_path.
    for key, value in {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                       "MPLBACKEND": "module://matplotlib_inline.backend_inline", "MM_CACHE": str(tmp_path),
                       "TMPDIR": str(tmp_path), "MM_MODEL_DIR": ""}.items():
        monkeypatch.setenv(key, value)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(nb, timeout=TIMEOUT, kernel_name=kernel_name(),
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the traceback) on any error

    executable = nb.cells[0].outputs[0]["text"].strip()
    assert os.path.realpath(executable) == os.path.realpath(sys.executable), "the kernel runs another Python"
    figures = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if "image/png" in o.get("data", {}))
    assert figures >= 3, f"{path.name} drew only {figures} figures"
