"""Benchmark scripts run as `python benchmarks/NAME.py`, which puts benchmarks/ first on sys.path: a script named
like an installed package's module would be imported in its place by any library that imports it (transformers
imports `kernels`, HF's kernel hub, so a benchmarks/kernels.py broke decode.py)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_no_script_shadows_an_installed_module():
    installed = importlib.metadata.packages_distributions()
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert scripts, f"no scripts found under {BENCHMARKS}"
    shadowing = {name: installed[name] for name in scripts if name in installed}
    assert not shadowing, f"benchmarks/ scripts named like installed modules (module: distributions): {shadowing}"
