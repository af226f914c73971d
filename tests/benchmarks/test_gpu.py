"""benchmarks/gpu.py --dry-run: the whole H200 script on CPU with tiny shapes and the Pallas interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


@pytest.mark.slow
def test_dry_run_checks_every_case_and_prints_the_table():
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--parts", "int4,dense,mla,decode,generate,sweep"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    table = rows[rows.index(next(r for r in rows if r.startswith("| case |"))) + 1:]
    cases = [r.split("|")[1].strip() for r in table]
    assert cases.count("int4 grouped matmul") == 4 and cases.count("mla decode attention") == 2
    assert cases.count("int4 tiling sweep") == 4  # two tilings of each projection
    assert cases.count("dense layer matmul") == 1
    assert cases.count("decode step, per MoE layer") == 1 and cases.count("generate, bundled model") == 1
    errors = [float(r.split("|")[3]) for r in table if r.split("|")[3].strip()]
    assert len(errors) == 12 and max(errors) < 2e-2
