"""The sharded model equals the single-device one: 8 CPU devices in a subprocess, and two jax.distributed processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("mesh_worker.py")
REPO = WORKER.parents[2]
TIMEOUT_S = 900  # generous: the 8-device workers compile many programs, slowly on a loaded 2-core machine


def _env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """CPU-only environment for a worker, with the repository importable (and `devices` CPU devices)."""
    flags = os.environ.get("XLA_FLAGS", "") + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "XLA_FLAGS": flags, **extra}


def _result(stdout: str) -> dict:
    """The JSON a worker printed on its RESULT line."""
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# experts: ids x columns; pages: (axes splitting rows, axes splitting each row's pages: context parallel)
# (a mesh like data=2,expert=4 splits rows and pages as the three-axis one does, over fewer axes: not repeated)
MESHES = {
    "expert=8": (1 / 8, [["expert"], []], [[], ["expert"]]),
    "data=8": (1, [["data"], []], [[], ["data"]]),
    "data=2,expert=2,tensor=2": (1 / 4, [["data", "expert"], ["tensor"]], [["data"], ["expert", "tensor"]]),
}


@pytest.mark.slow
def test_mesh_matches_single_device():
    """Three meshes of 8 CPU devices in one subprocess (one compile of the reference; one test, so that xdist's
    workers never run it twice), all on the XLA path: the native CPU kernel, which rounds x to int8 for INT4
    experts, runs only where XLA does not partition the trace, so one device and a mesh would take different
    paths. On each, also one step of packed prompt chunks of every slot, not in slot order, and the decode step
    compiled as Engine.run calls it and as run_step, counting collective-permutes."""
    proc = subprocess.run([sys.executable, str(WORKER), "meshes", *MESHES], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=_env(8, K2JAX_KERNELS="xla"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = _result(proc.stdout)
    for spec, (experts, split, few_rows_split) in MESHES.items():
        r = results[spec]
        assert r["rel_err"] < 1e-5, (spec, r)
        assert r["tokens_equal"] and r["few_rows_tokens_equal"], (spec, r)
        # prompt chunks of as many slots as the layout has, not in its row order, are not split as its rows are
        assert r["packed_tokens_equal"] and r["packed_logprob_err"] < 1e-4, (spec, r)
        assert r["expert_fraction"] == pytest.approx(experts), (spec, r)
        assert r["cache_fraction"] == pytest.approx(1 / 8), (spec, r)  # every device holds its own pages
        assert r["split"] == split and r["few_rows_split"] == few_rows_split, (spec, r)
        permutes = r["collective_permutes"]  # the step's host buffer is unpacked without halo exchanges
        assert permutes["packed_step"] == permutes["run_step"], (spec, permutes)
    assert any(results[spec]["packed_split"] for spec in MESHES), "no mesh splits the packed step's slots"


@pytest.mark.slow
def test_kernels_on_meshes_match_one_device():
    """Rows and positions split at once, both ways round (rows over data and expert with positions over tensor;
    rows over data with positions over expert and tensor), through the Mosaic and Triton attention kernels
    (interpreted). A mesh that splits only rows or only positions is a special case of these: its kernel sees
    one block of rows, or merges partial sums over one axis group."""
    specs = ["data=2,expert=2,tensor=2"]
    proc = subprocess.run([sys.executable, str(WORKER), "kernels", *specs], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=_env(8))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = _result(proc.stdout)
    assert len(results) == len(specs) * 2 * 2
    # The Mosaic INT4 kernel forms x . (128 + u) - 136 * sum(x), which spends ~7 bits (log2 136) of float32's 24 on
    # the offset: ~2e-5 relative per expert matmul against the XLA path, up to ~2e-4 in log-probs after 32 steps.
    for name, r in results.items():
        assert r["tokens_equal"] and r["logprob_err"] < 3e-4, (name, r)


@pytest.mark.slow
def test_two_processes_match_one():
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "distributed", f"127.0.0.1:{port}", "2", str(i),
                               "data=2,expert=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for i in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    results = [_result(out) for out, _ in outs]
    assert all(r["processes"] == 2 and r["devices"] == 4 for r in results)
    assert results[0]["tokens"] == results[1]["tokens"] == results[0]["single"]
