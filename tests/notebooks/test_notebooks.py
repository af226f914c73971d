"""Every notebook in notebooks/ runs top to bottom on CPU with the bundled model; cells needing more skip."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300
# Switches for the slow or accelerator-only cells, and device flags: CI runs the notebooks as a CPU user would.
DROPPED_ENV = ("K2JAX_FULL_PLAN", "K2JAX_CHECKPOINT", "K2JAX_MESH", "XLA_FLAGS")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


def kernel_env() -> dict[str, str]:
    """The kernel's environment: CPU only, this checkout first on the import path, no opt-in switches.

    The kernel is ipykernel's python3 spec from this venv (share/jupyter/kernels); jupyter_client runs it
    with sys.executable, so the notebook imports exactly what the tests do.
    """
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path, "JUPYTER_PLATFORM_DIRS": "1"}


def test_notebooks_are_there_and_committed_without_outputs():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "sharding.ipynb"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        ran = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not ran, f"{path.name}: cells {ran} have outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path):
    nb = nbformat.read(path, as_version=4)
    failed: list[int] = []
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
        on_cell_error=lambda cell, cell_index, execute_reply: failed.append(cell_index))
    try:
        client.execute(env=kernel_env())
    except nbclient.exceptions.CellExecutionError as e:
        cell = failed[0] if failed else "?"
        pytest.fail(f"{path.name}: cell {cell} failed:\n{ANSI.sub('', str(e))}", pytrace=False)
    except nbclient.exceptions.CellTimeoutError as e:
        pytest.fail(f"{path.name}: a cell ran over {CELL_TIMEOUT_S} s:\n{e}", pytrace=False)
