"""k2jax-generate: continue a prompt with a Kimi K2 model, streaming text to stdout and stats to stderr."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import jax

from k2jax.chat import StreamParser
from k2jax.cliargs import Parser, add_sampling_flags, int_in, load_model, mesh_spec, non_empty

IMPORTED = time.time()
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax.monitoring: at its start and its end
CACHE_HIT = "/jax/compilation_cache/cache_hits"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; a malformed or out-of-range one exits with code 2 and one line naming it."""
    ap = Parser(prog="k2jax-generate", description=__doc__)
    ap.add_argument("--model", default=None, help="HF or orbax checkpoint directory (default: the bundled model)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (reserved-token names in it become reserved tokens)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids (models without a tokenizer)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template; "
                    "print reasoning and answer separately")
    ap.add_argument("--system", default=None, help="system prompt for --chat")
    ap.add_argument("--max-new-tokens", type=int_in(1), default=128)
    add_sampling_flags(ap)
    ap.add_argument("--stop", type=non_empty, action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--mesh", type=mesh_spec, default=None,
                    help='device mesh, e.g. "expert=8" (default: all local devices)')
    return ap.parse_args(argv)


def read_prompt(args: argparse.Namespace) -> str | list[int]:
    """The prompt from --prompt, --prompt-file or --prompt-ids (default: a Python function header)."""
    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.split(",")]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text()
        except OSError as err:
            raise ValueError(f"--prompt-file {args.prompt_file}: {err.strerror}") from None
    return args.prompt if args.prompt is not None else "def fibonacci(n):"


def seconds_since_launch() -> float:
    """Seconds since this process started (from /proc on Linux; elsewhere since this module was imported)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return time.time() - IMPORTED
    started = int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")  # field 22: ticks after boot
    return uptime - started


class CompileNotice:
    """While entered, writes `message` once when an XLA compile runs over `delay_s` (a persistent-cache hit does not)."""

    def __init__(self, message: str, out: TextIO, delay_s: float = 1.0):
        self.message, self.out, self.delay_s = message, out, delay_s
        self.timer: threading.Timer | None = None
        self.said = False

    def __enter__(self) -> "CompileNotice":
        jax.monitoring.register_scalar_listener(self._started)
        jax.monitoring.register_event_listener(self._hit)
        jax.monitoring.register_event_duration_secs_listener(self._finished)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_scalar_listener(self._started)
        jax.monitoring.unregister_event_listener(self._hit)
        jax.monitoring.unregister_event_duration_listener(self._finished)
        self._cancel()

    def _say(self) -> None:
        if not self.said:
            self.said = True
            print(self.message, file=self.out, flush=True)

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _started(self, event: str, _value: float, **_: object) -> None:
        if event == BACKEND_COMPILE and not self.said:
            self._cancel()
            self.timer = threading.Timer(self.delay_s, self._say)
            self.timer.daemon = True
            self.timer.start()

    def _hit(self, event: str, **_: object) -> None:
        if event == CACHE_HIT:
            self._cancel()

    def _finished(self, event: str, _seconds: float, **_: object) -> None:
        if event == BACKEND_COMPILE:
            self._cancel()


class Echo:
    """Prints streamed text after the prompt, which it holds back until the first text (or flush())."""

    def __init__(self, prompt: str):
        self.pending = prompt

    def __call__(self, _row: int, text: str) -> None:
        self.flush()
        print(text, end="", flush=True)

    def flush(self) -> None:
        """Print the prompt if it is still held back."""
        print(self.pending, end="", flush=True)
        self.pending = ""


def stats_line(stats: dict[str, float], load_s: float, generate_at_s: float, finish: str) -> str:
    """The run's statistics, each named: first token counted from launch, decode speed without compiles.

    `generate_at_s`: seconds from launch to the generate call.
    """
    return (f"-- prompt {stats['prompt_tokens']} tok | generated {stats['generated_tokens']} tok | "
            f"first token {generate_at_s + stats['time_to_first_token_s']:.2f} s after launch (load {load_s:.2f} s, "
            f"compile {stats['compile_before_first_token_s']:.2f} s) | decode {stats['decode_tokens_per_s']:.1f} "
            f"tok/s (compiles excluded) | finish {finish}")


def chat_printer() -> tuple[StreamParser, callable]:
    """A streaming parser and a callback that prints reasoning and answer under their own headers."""
    parser, section = StreamParser(), [None]

    def show(_row: int, text: str) -> None:
        for delta in parser.feed(text):
            for name, value in (("reasoning", delta.reasoning_content), ("answer", delta.content)):
                if value:
                    if section[0] != name:
                        print(f"\n[{name}] ", end="")
                        section[0] = name
                    print(value, end="", flush=True)
            for call in delta.tool_calls:
                print(f"\n[tool call] {call['function']['name']}({call['function']['arguments']})", flush=True)

    return parser, show


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (2 for bad input)."""
    args = parse_args(argv)
    echo = None
    try:
        prompt = read_prompt(args)
        load_start = time.perf_counter()
        model = load_model(args.model, args.mesh)
        load_s = time.perf_counter() - load_start
        if args.chat:
            if model.tokenizer is None or not isinstance(prompt, str):
                raise ValueError("--chat needs a model with a tokenizer and a text prompt")
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt}]
            prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            _, on_text = chat_printer()
        elif model.tokenizer is not None:
            on_text = echo = Echo(prompt if isinstance(prompt, str) else "")
        else:
            on_text = None
        generate_at_s = seconds_since_launch()
        with CompileNotice("k2jax-generate: compiling ...", sys.stderr):
            out = model.generate([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed,
                                 stop=args.stop, on_text=on_text)
    except (ValueError, FileNotFoundError) as err:
        print(f"k2jax-generate: error: {err}", file=sys.stderr)
        return 2
    if echo is not None:
        echo.flush()
    if model.tokenizer is None:
        print(" ".join(map(str, out.ids[0])))
    print("\n" + stats_line(out.stats, load_s, generate_at_s, out.finish_reasons[0]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
