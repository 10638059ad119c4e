"""Every notebook in experiments/notebooks runs top to bottom on CPU without an error (nbclient, a fresh kernel per
notebook), shrunk by DSV3_NOTEBOOK_SMOKE=1 and with XLA's cheapest compile settings."""

import glob
import os

import nbclient
import nbformat
import pytest

from tests.fast_compile import ROOT, subprocess_env

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "experiments", "notebooks", "*.ipynb")))


def test_every_notebook_is_collected():
    assert {os.path.basename(p) for p in NOTEBOOKS} >= {"quickstart.ipynb", "scaling.ipynb", "fp8.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.basename(p))
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    env = dict(subprocess_env(), DSV3_NOTEBOOK_SMOKE="1", MPLBACKEND="Agg")
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)   # raises CellExecutionError naming the cell on any error
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
