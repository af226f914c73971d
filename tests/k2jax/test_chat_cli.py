"""k2jax-chat: the demo tools, the event printer, and the REPL on the bundled model."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import k2jax
from k2jax.agent import Event
from k2jax.chat_cli import calculate, convert_units, demo_task, event_printer, lookup_capital, main, parse_args

BUNDLED = Path(k2jax.__file__).parent / "bundled"


def test_demo_tools():
    assert calculate("12 + 30") == "42" and calculate("2 * (3 - 10)") == "-14" and calculate("7 / 2") == "3.5"
    with pytest.raises(ValueError, match="unsupported"):
        calculate("__import__('os').getcwd()")
    assert convert_units(5, "km", "mi") == "3.11 mi" and convert_units(100, "c", "f") == "212 f"
    assert convert_units(10, "kg", "lb") == "22.05 lb"
    with pytest.raises(ValueError, match="cannot convert kg to mi"):
        convert_units(1, "kg", "mi")
    assert lookup_capital("Japan") == "Tokyo"
    with pytest.raises(KeyError, match="Atlantis"):
        lookup_capital("Atlantis")
    assert len({demo_task(i) for i in range(50)}) == 50


def test_event_printer_sections():
    out = io.StringIO()
    show = event_printer(out)
    call = {"id": "functions.calculate:0", "function": {"name": "calculate", "arguments": '{"expression": "1 + 2"}'}}
    for event in (Event("reasoning", 0, "I will "), Event("reasoning", 0, "add."), Event("tool_call", 0, call=call),
                  Event("tool_result", 0, "3", call), Event("content", 1, "It is 3."), Event("content", 2, "Yes.")):
        show(event)
    assert out.getvalue() == ('\n[reasoning] I will add.\n[tool call] calculate({"expression": "1 + 2"})'
                              "\n[tool result] 3\n[answer] It is 3.\n[answer] Yes.")


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "k2jax.chat_cli", "--help"], check=False, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert done.returncode == 0 and "k2jax-chat" in done.stdout and "--tools" in done.stdout


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "k2jax-chat: error:" in capsys.readouterr().err


def test_repl_with_tools_on_the_bundled_model(monkeypatch, capsys):
    if not (BUNDLED / "config.json").is_file():
        pytest.skip("the bundled tool-calling model is not in k2jax/bundled yet")
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 12 plus 30?\n/reset\nWhat is the capital of Japan?\n"
                                                  "/exit\nnever read\n"))
    assert main(["--model", str(BUNDLED), "--tools", "--max-new-tokens", "64", "--capacity", "512"]) == 0
    out, err = capsys.readouterr()
    assert "[tool call] calculate(" in out and "[tool call] lookup_capital(" in out and "[tool result] " in out
    assert err.count(" step(s) | prefilled") == 2 and "-- new conversation" in err


def test_grammar_flags(capsys):
    args = parse_args(["--tools", "--no-tool-grammar", "--max-reasoning-tokens", "0"])
    assert args.no_tool_grammar and args.max_reasoning_tokens == 0
    assert not parse_args(["--tools"]).no_tool_grammar and parse_args([]).max_reasoning_tokens is None
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--max-reasoning-tokens", "-1"])
    assert exit_.value.code == 2 and "--max-reasoning-tokens" in capsys.readouterr().err
