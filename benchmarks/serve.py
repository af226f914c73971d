"""k2jax-serve against llama.cpp's llama-server on the same float32 weights, under the same streaming client load.

Each server runs as its own process on 127.0.0.1 with `--slots` sequences decoded together; one client process
(the official openai client, asyncio) drives both with the same requests. Loads:
- random: prompts of 128-1024 random tokens, each request its own (no prefix to reuse);
- shared: every prompt is one fixed 1,024-token prefix plus 32-128 random tokens (an agent's system prompt and
  tools), so a prefix cache can skip most prefill. Before it is measured, each server gets one request that carries
  the prefix, as an agent's server has from the agent's first request on.
At each number of clients, every client sends `--requests` streaming completions of exactly `--max-tokens` tokens
one after another. Reported per server: output tokens/s over the level's wall time, time to first token (TTFT)
and time per output token after the first (TPOT), p50 and p99; then k2jax / llama-server.

    python benchmarks/serve.py [--models bundled,small] [--loads random,shared] [--clients 1,8,32,64]

Models: "bundled" (k2jax/bundled, experts dequantised to float32) and any preset name (random weights, byte-level
tokenizer). Both servers are given the same float32 HF checkpoint (llama.cpp its GGUF conversion); prompts are
token ids, so tokenization does not enter. llama.cpp is built on first use (see benchmarks/llamacpp.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import k2jax
from benchmarks import llamacpp

BUNDLED = Path(k2jax.__file__).parent / "bundled"
PROMPT_RANGE = (128, 1024)
SHARED_PREFIX = 1024
SUFFIX_RANGE = (32, 128)
PROMPT_ID_RANGE = 256  # prompt ids are drawn below this: valid, non-special tokens in every vocabulary used here


def load_model(name: str, root: Path) -> k2jax.Model:
    """The bundled model, or a random model of preset `name` with a byte-level tokenizer."""
    if name == "bundled":
        return k2jax.load(BUNDLED)
    from checkpoints.hf_writer import write_hf_checkpoint
    from k2jax.synthetic import random_state

    tok = llamacpp.byte_tokenizer()
    cfg = dataclasses.replace(k2jax.preset(name), vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                              eos_token_id=tok.eos_id)
    tok.save(root / "tokenizer")
    write_hf_checkpoint(root / "random", cfg, random_state(cfg, seed=0, dtype=np.float32), root / "tokenizer")
    return k2jax.load(root / "random")


def prompts(load: str, clients: int, n_requests: int, seed: int) -> list[list[list[int]]]:
    """Token-id prompts per client and request for `load` ("random" or "shared")."""
    rng = np.random.default_rng(seed)
    prefix = np.random.default_rng(10**6).integers(0, PROMPT_ID_RANGE, SHARED_PREFIX).tolist()

    def one() -> list[int]:
        if load == "random":
            return rng.integers(0, PROMPT_ID_RANGE, rng.integers(*PROMPT_RANGE, endpoint=True)).tolist()
        return prefix + rng.integers(0, PROMPT_ID_RANGE, rng.integers(*SUFFIX_RANGE, endpoint=True)).tolist()

    return [[one() for _ in range(n_requests)] for _ in range(clients)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values, nan if none."""
    return float(np.percentile(np.asarray(values), q, method="nearest")) if values else float("nan")


async def one_client(client, requests: list[list[int]], max_tokens: int, seed: int) -> list[tuple[float, float, int]]:
    """Send the requests one after another, streaming: (TTFT s, TPOT s, output tokens) per request. The prompt ids
    ride in extra_body: passed as `prompt`, the client type-checks every id in Python (~22 ms of the client's CPU for
    1,100 ids, against ~1 ms for the whole request), time the 2 cores' servers would lose to the client."""
    out = []
    for r, prompt in enumerate(requests):
        start = time.perf_counter()
        stream = await client.completions.create(model="bench", prompt=[], max_tokens=max_tokens,
                                                 temperature=1.0, seed=seed + r, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"prompt": prompt, "ignore_eos": True})
        first = last = None
        chunks, usage = 0, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                last = time.perf_counter()
                first = first or last
                chunks += 1
            usage = chunk.usage or usage
        tokens = usage.completion_tokens if usage else chunks
        first = first or time.perf_counter()
        out.append((first - start, (last - first) / max(tokens - 1, 1) if last else 0.0, tokens))
    return out


class Retries(logging.Handler):
    """Counts the openai client's retries (it logs each one)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith("Retrying request")


async def run_level(url: str, requests: list[list[list[int]]], max_tokens: int, seed: int) -> dict[str, float]:
    """One load level (a client per entry of `requests`): tokens/s, TTFT and TPOT p50/p99, and how many requests
    the client retried (its default of 2 retries: llama-server drops some of 32 connections opened at once, before
    answering; a retry's wait counts in its TTFT)."""
    import openai

    retries, logger = Retries(), logging.getLogger("openai._base_client")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(retries)
    try:
        async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=2, timeout=1800) as client:
            start = time.perf_counter()
            results = await asyncio.gather(*(one_client(client, reqs, max_tokens, seed + 1000 * c)
                                             for c, reqs in enumerate(requests)))
            wall = time.perf_counter() - start
    finally:
        logger.removeHandler(retries)
        logger.setLevel(level)
    done = [r for rs in results for r in rs]
    ttft, tpot = [r[0] for r in done], [r[1] for r in done]
    return {"tok_s": sum(r[2] for r in done) / wall, "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99), "retries": retries.count}


@contextlib.contextmanager
def k2jax_server(model_dir: Path, slots: int, context: int, timeout_s: float = 900) -> Iterator[str]:
    """k2jax-serve in its own process, ready (every program compiled) before this yields its base URL."""
    port = llamacpp.free_port()
    args = [sys.executable, "-m", "k2jax.serve", "--model", str(model_dir), "--port", str(port), "--max-batch",
            str(slots), "--max-context", str(context), "--served-model-name", "bench", "--log-level", "warning"]
    with llamacpp.running(args, port, timeout_s):
        yield f"http://127.0.0.1:{port}/v1"


def measure(url: str, loads: list[str], levels: list[int], n_requests: int, max_tokens: int,
            server: str) -> dict[tuple, dict]:
    """Warm a server at every level once (and, for the shared load, with one request carrying its prefix, which an
    agent's server holds from its first request on), then measure every (load, clients), printing each row as it
    comes; a level that fails is recorded (and printed) with its error, and the server's remaining levels are
    skipped."""
    for clients in levels:
        asyncio.run(run_level(url, prompts("random", clients, 1, 99), max_tokens, 99))
    if "shared" in loads:
        asyncio.run(run_level(url, prompts("shared", 1, 1, 98), max_tokens, 98))
    results: dict[tuple, dict] = {}
    for load in loads:
        for clients in levels:
            try:
                results[load, clients] = asyncio.run(run_level(url, prompts(load, clients, n_requests, clients),
                                                               max_tokens, 0))
            except Exception as err:  # a dropped connection or a dead server: keep what was measured
                results[load, clients] = {"error": f"{type(err).__name__}: {err}"}
            print(f"  {server} {load} {clients} clients: {row(results[load, clients])}", flush=True)
            if "error" in results[load, clients]:
                return results
    return results


def row(r: dict) -> str:
    """One server's cells: tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms, or its error across them."""
    if "error" in r:
        return f"failed: {r['error'][:300]} | | "
    retried = f" ({r['retries']} retried)" if r.get("retries") else ""
    return (f"{r['tok_s']:.0f}{retried} | {1e3 * r['ttft_p50']:.0f} / {1e3 * r['ttft_p99']:.0f} | "
            f"{1e3 * r['tpot_p50']:.1f} / {1e3 * r['tpot_p99']:.1f}")


def main() -> int:
    """Convert, serve, load, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bundled,small", help="bundled and/or preset names (random weights)")
    ap.add_argument("--loads", default="random,shared")
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--slots", type=int, default=None, help="sequences decoded together (default: most clients)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, sent one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    loads = args.loads.split(",")
    slots = args.slots or max(levels)
    context = max(PROMPT_RANGE[1], SHARED_PREFIX + SUFFIX_RANGE[1]) + args.max_tokens + 64
    tables = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            hf = llamacpp.write_f32_hf(load_model(name, root), root / "f32")
            gguf = llamacpp.to_gguf(hf, root / "f32.gguf")
            with k2jax_server(hf, slots, context) as url:
                ours = measure(url, loads, levels, args.requests, args.max_tokens, f"{name} k2jax-serve")
            try:
                with llamacpp.server(gguf, slots, context) as url:
                    theirs = measure(url, loads, levels, args.requests, args.max_tokens, f"{name} llama-server")
            except RuntimeError as err:  # llama-server died: its log is in the error
                theirs = {key: {"error": str(err)} for key in ours}
        tables.append((name, ours, theirs))
    print(f"\n{slots} slots each, 2 threads for llama-server; {args.requests} streaming completions of "
          f"{args.max_tokens} tokens per client; float32 weights on both sides\n")
    print("| model | load | clients | server | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | k2jax / llama |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for name, ours, theirs in tables:
        for key in ours:
            missing = {"error": "not run (an earlier level failed)"}
            pair = (ours[key], theirs.get(key, missing))
            ratio = f"{pair[0]['tok_s'] / pair[1]['tok_s']:.2f}x" if all("tok_s" in r for r in pair) else ""
            for label, r in zip(("k2jax-serve", "llama-server"), pair):
                print(f"| {name} | {key[0]} | {key[1]} | {label} | {row(r)} | {ratio if label == 'k2jax-serve' else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
