"""Every notebook in notebooks/ runs top to bottom on CPU with the bundled model; cells needing more skip."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300
# Switches for the slow or accelerator-only cells, device flags, what the test session sets for libtpu, and
# pytest's marker, which stops ipykernel from showing C libraries' output in the cells: CI runs the notebooks as
# a CPU user would.
DROPPED_ENV = ("K2JAX_FULL_PLAN", "K2JAX_CHECKPOINT", "K2JAX_MESH", "XLA_FLAGS", "TPU_HOST_BOUNDS",
               "TPU_WORKER_HOSTNAMES", "PYTEST_CURRENT_TEST")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks
# What a user must not see: libtpu's start-up errors on a machine without TPU, warnings (compilation cache, tqdm).
NOISE = re.compile(r"InitGoogle|Source Location Trace|TPU_WORKER_HOSTNAMES|host bounds|Warning|persistent compilation")


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
    noisy = [(i, o.text) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs
             if o.output_type == "stream" and o.name == "stderr" and NOISE.search(o.text)]
    assert not noisy, f"{path.name}: (cell, stderr) with noise: {noisy}"


def install_cell(path: Path) -> str:
    """Source of a notebook's first code cell, which must be its install cell (tagged "install")."""
    cell = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert "install" in cell.metadata.get("tags", []), f"{path.name}: the first code cell is not the install cell"
    return cell.source


def test_every_notebook_starts_with_the_same_install_cell():
    assert len({install_cell(path) for path in NOTEBOOKS}) == 1


def run_install_cell(source: str, monkeypatch: pytest.MonkeyPatch, installed: bool = False,
                     tpu: bool = False) -> list[list[str]]:
    """Run the install cell with K2JAX_SOURCE set as a user edits it; the commands it would run (none are run)."""
    code = install_cell(NOTEBOOKS[0])
    assert code.count('K2JAX_SOURCE = ""\n') == 1
    commands: list[list[str]] = []
    version = importlib.metadata.version

    def missing(name: str) -> str:
        if name == "k2jax" and not installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    monkeypatch.setattr(subprocess, "check_call", commands.append)
    monkeypatch.setattr(shutil, "which", lambda _name: None)  # no nvidia-smi
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    if tpu:
        monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    exec(code.replace('K2JAX_SOURCE = ""\n', f"K2JAX_SOURCE = {source!r}\n"), {})
    return commands


def test_install_cell_without_a_source_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert run_install_cell("", monkeypatch, installed=True) == []
    with pytest.raises(RuntimeError, match="k2jax is not installed: set K2JAX_SOURCE at the top of this cell"):
        run_install_cell("", monkeypatch)


def test_install_cell_clones_a_url_or_installs_a_wheel(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    url = "https://example.org/k2jax.git"
    assert run_install_cell(url, monkeypatch) == [["git", "clone", "--depth", "1", url, "k2jax-src"],
                                                  [*pip, str(tmp_path / "k2jax-src")]]
    wheel = tmp_path / "k2jax-0.1.0-py3-none-any.whl"
    assert run_install_cell(str(wheel), monkeypatch, tpu=True) == [[*pip, f"{wheel}[tpu]"]]
