"""k2jax-generate as a new user runs it on a machine with libtpu and no TPU: a quiet stderr and named timings."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATS = re.compile(r"-- prompt \d+ tok \| generated 4 tok \| first token ([\d.]+) s after launch \(load ([\d.]+) s, "
                   r"compile ([\d.]+) s\) \| decode [\d.]+ tok/s \(compiles excluded\) \| finish length")
COMPILING = "k2jax-generate: compiling ..."


def generate(env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run k2jax-generate (4 new tokens) as a fresh process; its result and wall seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "k2jax.generate", "--max-new-tokens", "4"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    return done, time.perf_counter() - start


def test_cold_then_warm_run_print_only_progress_and_stats(user_env, tmp_path):
    env = {**user_env, "K2JAX_COMPILATION_CACHE": str(tmp_path / "xla")}
    for run in ("cold", "warm"):
        done, wall_s = generate(env)
        assert done.returncode == 0, done.stderr[-4000:]
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        # No libtpu start-up errors, no compilation-cache warnings: a cold run says it compiles, a warm one does not.
        assert lines[:-1] == ([COMPILING] if run == "cold" else []), f"{run} run's stderr:\n{done.stderr}"
        stats = STATS.fullmatch(lines[-1])
        assert stats, f"{run} run's stats line: {lines[-1]}"
        first_token_s, load_s, compile_s = map(float, stats.groups())
        # The clock starts at launch: the first token comes after loading and compiling, before the process exits.
        assert load_s + compile_s < first_token_s < wall_s
        assert done.stdout.startswith("def fibonacci(n):") and done.stdout.count("def fibonacci(n):") == 1
