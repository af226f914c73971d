"""k2jax-chat: an interactive chat with a Kimi K2 model; `--tools` lets it call demo tools through the agent loop.

Tool calls are grammar-enforced (only the demo tools, with arguments that match their signatures) unless
--no-tool-grammar; --max-reasoning-tokens ends each step's reasoning after that many tokens.

Each line you type is a user turn; the conversation's cached pages stay in the prefix cache, so a turn prefills
little more than what it adds.
Commands: /reset starts a new conversation, /exit (or end of input) quits.
"""

from __future__ import annotations

import argparse
import ast
import operator
import sys
from collections.abc import Callable
from typing import Any, TextIO

from k2jax.agent import Agent, AgentResult, Event, conversation_scheduler
from k2jax.generate import CompileNotice
from k2jax.cliargs import Parser, add_sampling_flags, int_in, load_model, mesh_spec
from k2jax.sampling import SamplingParams

BINARY_OPS: dict[type, Callable[[Any, Any], Any]] = {ast.Add: operator.add, ast.Sub: operator.sub,
                                                     ast.Mult: operator.mul, ast.Div: operator.truediv}
UNARY_OPS: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# unit -> (quantity, value of one unit in the quantity's base unit); temperatures are affine, handled apart.
UNITS = {"km": ("length", 1000.0), "m": ("length", 1.0), "mi": ("length", 1609.344), "ft": ("length", 0.3048),
         "kg": ("mass", 1.0), "lb": ("mass", 0.45359237), "l": ("volume", 1.0), "gal": ("volume", 3.785411784)}
TO_CELSIUS = {"c": lambda t: t, "f": lambda t: (t - 32) * 5 / 9}
FROM_CELSIUS = {"c": lambda t: t, "f": lambda t: t * 9 / 5 + 32}
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "India": "New Delhi", "Brazil": "Brasilia", "Canada": "Ottawa",
            "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi", "Mexico": "Mexico City", "Peru": "Lima",
            "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin",
            "Argentina": "Buenos Aires"}


def arithmetic(node: ast.AST) -> float:
    """Value of a parsed expression made only of numbers, + - * / and parentheses."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        return BINARY_OPS[type(node.op)](arithmetic(node.left), arithmetic(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
        return UNARY_OPS[type(node.op)](arithmetic(node.operand))
    raise ValueError(f"unsupported in an arithmetic expression: {ast.unparse(node)!r}")


def format_number(x: float) -> str:
    """A number as the tools print it: an integer when whole, else at most two decimals."""
    x = round(x, 2)
    return str(int(x)) if x == int(x) else f"{x:.2f}".rstrip("0")


def calculate(expression: str) -> str:
    """Evaluate an integer expression 'a op b' with op in + - *."""
    return format_number(arithmetic(ast.parse(expression, mode="eval").body))


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a value between units."""
    src, dst = from_unit.lower(), to_unit.lower()
    if src in TO_CELSIUS and dst in FROM_CELSIUS:
        return f"{format_number(FROM_CELSIUS[dst](TO_CELSIUS[src](value)))} {to_unit}"
    if src not in UNITS or dst not in UNITS or UNITS[src][0] != UNITS[dst][0]:
        raise ValueError(f"cannot convert {from_unit} to {to_unit}; units: {', '.join([*UNITS, *TO_CELSIUS])}")
    return f"{format_number(value * UNITS[src][1] / UNITS[dst][1])} {to_unit}"


def lookup_capital(country: str) -> str:
    """Look up the capital city of a country."""
    if country not in CAPITALS:
        raise KeyError(f"no capital known for {country!r}")
    return CAPITALS[country]


DEMO_TOOLS = (calculate, convert_units, lookup_capital)
DEMO_TASKS = ("What is {a} plus {b}?", "Convert {a} kilometers to miles.", "What is the capital of {country}?",
              "Compute {a} * {b}.", "How many pounds is {a} kilograms?")


def demo_task(i: int) -> str:
    """The i-th of an endless, deterministic series of questions the demo tools answer."""
    countries = sorted(CAPITALS)
    country = countries[i // len(DEMO_TASKS) % len(countries)]
    return DEMO_TASKS[i % len(DEMO_TASKS)].format(a=10 + i, b=3 + i % 7, country=country)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; a malformed or out-of-range one exits with code 2 and one line naming it."""
    ap = Parser(prog="k2jax-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF or orbax checkpoint directory (default: the bundled model)")
    ap.add_argument("--system", default=None, help="system prompt (default: the template's)")
    ap.add_argument("--tools", action="store_true", help="let the model call demo tools: "
                    + ", ".join(t.__name__ for t in DEMO_TOOLS))
    ap.add_argument("--no-tool-grammar", action="store_true", help="do not enforce tool calls with a grammar")
    ap.add_argument("--max-reasoning-tokens", type=int_in(0), default=None,
                    help="reasoning tokens per step before </think> is forced (default: no limit)")
    ap.add_argument("--max-steps", type=int_in(1), default=30, help="model turns per user turn (tool loop limit)")
    ap.add_argument("--max-new-tokens", type=int_in(1), default=512)
    ap.add_argument("--capacity", type=int_in(1), default=None, help="tokens the conversation's cache slot holds")
    add_sampling_flags(ap, min_p=False)
    ap.add_argument("--mesh", type=mesh_spec, default=None,
                    help='device mesh, e.g. "expert=8" (default: all local devices)')
    return ap.parse_args(argv)


def event_printer(out: TextIO) -> Callable[[Event], None]:
    """A callback that prints reasoning and answer under a header per step, and each tool call and result."""
    section: list[tuple[int, str] | None] = [None]

    def show(event: Event) -> None:
        if event.kind in ("reasoning", "content"):
            header = "reasoning" if event.kind == "reasoning" else "answer"
            if section[0] != (event.step, header):
                print(f"\n[{header}] ", end="", file=out)
                section[0] = (event.step, header)
            print(event.text, end="", file=out, flush=True)
            return
        section[0] = None
        function = event.call["function"]
        line = f"{function['name']}({function['arguments']})" if event.kind == "tool_call" else event.text
        print(f"\n[{event.kind.replace('_', ' ')}] {line}", end="", file=out, flush=True)

    return show


def summary(result: AgentResult) -> str:
    """One line of statistics for a user turn."""
    prompt = sum(s.prompt_tokens for s in result.steps)
    prefilled = sum(s.prefilled_tokens for s in result.steps)
    seconds = sum(s.seconds for s in result.steps)
    return (f"-- {len(result.steps)} step(s) | prefilled {prefilled} of {prompt} prompt tokens | "
            f"generated {sum(s.generated_tokens for s in result.steps)} | {seconds:.2f} s | {result.stop_reason}")


def repl(make_agent: Callable[[], Agent], max_steps: int, lines: TextIO, out: TextIO, err: TextIO) -> None:
    """Read user turns from `lines` until /exit or end of input; each runs the agent loop."""
    agent = make_agent()
    while True:
        if lines.isatty():
            print("\n> ", end="", file=err, flush=True)
        line = lines.readline()
        text = line.strip()
        if not line or text in ("/exit", "/quit"):
            return
        if text == "/reset":
            agent = make_agent()
            print("-- new conversation", file=err)
        elif text:
            try:
                result = agent.run(text, max_steps)
            except ValueError as error:
                print(f"\nk2jax-chat: error: {error}", file=err, flush=True)
                continue
            print(file=out, flush=True)
            print(summary(result), file=err, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the chat; returns the process exit code (2 for bad input)."""
    args = parse_args(argv)
    try:
        model = load_model(args.model, args.mesh)
        scheduler = conversation_scheduler(model, args.capacity)
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, seed=args.seed)
        tools = DEMO_TOOLS if args.tools else ()

        def make_agent() -> Agent:
            return Agent(model, tools, system=args.system, sampling=sampling, max_new_tokens=args.max_new_tokens,
                         scheduler=scheduler, on_event=event_printer(sys.stdout), tool_grammar=not args.no_tool_grammar,
                         max_reasoning_tokens=args.max_reasoning_tokens)

        print("k2jax-chat: type a message; /reset starts over, /exit quits", file=sys.stderr)
        with CompileNotice("k2jax-chat: compiling ...", sys.stderr):
            repl(make_agent, args.max_steps, sys.stdin, sys.stdout, sys.stderr)
    except (ValueError, FileNotFoundError) as error:
        print(f"k2jax-chat: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
