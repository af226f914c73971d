"""The CLIs as subprocesses: a bad flag, or a checkpoint that cannot load, exits 2 with one line naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import k2jax
from k2jax.convert import main as convert

TIMEOUT_S = 300

FLAG_CASES = [  # (module, argv, the flag the one line must name)
    ("generate", ["--seed", "-1"], "argument --seed"),
    ("generate", ["--seed", str(2**70)], "argument --seed"),
    ("generate", ["--top-k", str(2**40)], "argument --top-k"),
    ("generate", ["--mesh", "expert=0"], "argument --mesh"),
    ("generate", ["--mesh", "expert=1,expert=1"], "argument --mesh"),
    ("generate", ["--stop", ""], "argument --stop"),
    ("chat_cli", ["--temperature", "nan"], "argument --temperature"),
    ("serve", ["--port", "99999"], "argument --port"),
    ("serve", ["--port", "0"], "argument --port"),
    ("convert", ["in", "out", "--mesh", "tensor=1,data=-2"], "argument --mesh"),
    ("plan", ["--topology", "v5e:2x2", "--batch", "0"], "argument --batch"),
]


def run_cli(module: str, *argv: str) -> subprocess.CompletedProcess:
    """`python -m k2jax.<module> argv...` on the CPU, from this checkout."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(k2jax.__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", f"k2jax.{module}", *argv], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT_S)


def assert_one_line_error(done: subprocess.CompletedProcess, program: str, *words: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), done.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize(("module", "argv", "flag"), FLAG_CASES)
def test_a_bad_flag_exits_2_with_one_line_naming_it(module, argv, flag):
    program = {"chat_cli": "k2jax-chat"}.get(module, f"k2jax-{module}")
    assert_one_line_error(run_cli(module, *argv), program, flag)


@pytest.fixture(scope="module")
def broken_orbax(tmp_path_factory) -> Path:
    """The bundled model as orbax, with one array data file deleted."""
    out = tmp_path_factory.mktemp("broken") / "orbax"
    assert convert([str(Path(k2jax.__file__).parent / "bundled"), str(out)]) == 0
    data = [f for f in (out / "params").rglob("*") if f.is_file() and f.parent.name == "d"]
    max(data, key=lambda f: f.stat().st_size).unlink()
    return out


@pytest.mark.parametrize("module", ["generate", "chat_cli"])
def test_a_broken_orbax_model_exits_2_with_one_line(broken_orbax, module):
    program = {"chat_cli": "k2jax-chat"}.get(module, f"k2jax-{module}")
    assert_one_line_error(run_cli(module, "--model", str(broken_orbax)), program, f"--model {broken_orbax}",
                          str(broken_orbax / "params"), "missing or damaged")


def test_a_truncated_rank_file_is_named(tmp_path):
    ckpt = Path(shutil.copytree(Path(k2jax.__file__).parent / "bundled", tmp_path / "ckpt"))
    ranks = ckpt / "tiktoken.model"
    lines = ranks.read_bytes().splitlines(keepends=True)
    ranks.write_bytes(b"".join(lines[: len(lines) // 2]))
    with pytest.raises(ValueError, match=f"^{ranks}: holds {len(lines) // 2} tokens, .* the rank file is truncated"):
        k2jax.load(ckpt)
    assert_one_line_error(run_cli("generate", "--model", str(ckpt)), "k2jax-generate", f"{ranks}: holds")
