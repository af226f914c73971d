"""k2jax-generate: continue a prompt with a Kimi K2 model, streaming text to stdout and stats to stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from k2jax.chat import StreamParser
from k2jax.cliargs import Parser, add_sampling_flags, int_in, load_model, mesh_spec, non_empty


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
    try:
        prompt = read_prompt(args)
        model = load_model(args.model, args.mesh)
        if args.chat:
            if model.tokenizer is None or not isinstance(prompt, str):
                raise ValueError("--chat needs a model with a tokenizer and a text prompt")
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt}]
            prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            _, on_text = chat_printer()
        else:
            on_text = None if model.tokenizer is None else (lambda _r, t: print(t, end="", flush=True))
            if isinstance(prompt, str):
                print(prompt, end="", flush=True)
        out = model.generate([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed,
                             stop=args.stop, on_text=on_text)
    except (ValueError, FileNotFoundError) as err:
        print(f"k2jax-generate: error: {err}", file=sys.stderr)
        return 2
    if model.tokenizer is None:
        print(" ".join(map(str, out.ids[0])))
    s = out.stats
    print(f"\n-- prompt {s['prompt_tokens']} tok | generated {s['generated_tokens']} tok | "
          f"first token {s['time_to_first_token_s']:.2f} s (compile {s['compile_s']:.2f} s) | decode {s['decode_tokens_per_s']:.1f} tok/s | "
          f"finish {out.finish_reasons[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
