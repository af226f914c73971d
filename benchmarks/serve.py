"""Serving throughput and time to first token of k2jax-serve at several numbers of concurrent streaming clients.

Starts the server in-process on 127.0.0.1 (free port), warms every concurrency level once (compiles), then each
client sends `--requests` streaming completions one after another. Prints a markdown table: generated tokens/s
over the wall time of a level, and TTFT (request sent -> first streamed token) p50/p99. Every request has its own
random prompt, so prefill is never skipped by the prefix cache.

    python benchmarks/serve.py [--model DIR] [--clients 1,8,32] [--requests 4] [--prompt-tokens 128] [--max-tokens 64]

Without --model it serves the bundled model when installed, else a random model of `--preset` with a byte-level
tokenizer (numbers then measure the serving stack, not a useful model).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

import k2jax
from k2jax import chat
from k2jax.scheduler import Scheduler
from k2jax.server import BackgroundServer, create_app
from k2jax.service import Service
from k2jax.tokenizer import Tokenizer, kimi_specials

BUNDLED = Path(k2jax.__file__).parent / "bundled"


def byte_tokenizer() -> Tokenizer:
    """The smallest valid K2 tokenizer: the 256 single bytes plus Kimi's reserved tokens."""
    tokens = [bytes([b]) for b in range(256)]
    return Tokenizer(tokens, kimi_specials(len(tokens)), chat.bundled_template())


def synthetic_model(preset: str, root: Path) -> k2jax.Model:
    """A random checkpoint of `preset` (vocab resized to the byte tokenizer), written and loaded like a real one."""
    from checkpoints.hf_writer import write_hf_checkpoint
    from k2jax.synthetic import random_state

    tok = byte_tokenizer()
    cfg = dataclasses.replace(k2jax.preset(preset), vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                              eos_token_id=tok.eos_id)
    tok.save(root / "tokenizer")
    write_hf_checkpoint(root / "model", cfg, random_state(cfg, seed=0, dtype=np.float32), root / "tokenizer")
    return k2jax.load(root / "model")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values."""
    return float(np.percentile(np.asarray(values), q, method="nearest"))


def random_prompt(seed: int, length: int) -> list[int]:
    """A prompt of random byte tokens, distinct per seed, so no request finds another's prompt cached."""
    return np.random.default_rng(seed).integers(0, 256, length).tolist()


async def one_client(client, name: str, prompt_tokens: int, n_requests: int, max_tokens: int,
                     seed: int) -> tuple[list[float], int]:
    """Send n_requests streaming completions of exactly max_tokens in a row: (TTFT of each, generated tokens)."""
    ttfts, tokens = [], 0
    for r in range(n_requests):
        prompt = random_prompt(seed * 1000 + r, prompt_tokens)
        start = time.perf_counter()
        stream = await client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=1.0,
                                                 seed=seed * 1000 + r, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        first = None
        async for chunk in stream:
            if first is None and chunk.choices:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens += chunk.usage.completion_tokens
        ttfts.append(first if first is not None else time.perf_counter() - start)
    return ttfts, tokens


async def run_level(url: str, name: str, prompt_tokens: int, clients: int, n_requests: int, max_tokens: int,
                    seed: int) -> dict[str, float]:
    """One concurrency level: wall time, tokens/s, TTFT p50/p99."""
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, name, prompt_tokens, n_requests, max_tokens, seed + c)
                                         for c in range(clients)))
        wall = time.perf_counter() - start
    ttfts = [t for ts, _ in results for t in ts]
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(ttfts), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(ttfts, 50), "ttft_p99_ms": 1e3 * percentile(ttfts, 99)}


def main() -> int:
    """Run every level and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: bundled, else a random --preset model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=4, help="requests per client, sent one after another")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model or (BUNDLED / "config.json").exists():
            path = args.model or BUNDLED
            model, label = k2jax.load(path), Path(path).name
        else:
            model, label = synthetic_model(args.preset, Path(tmp)), f"random {args.preset} preset"
        scheduler = Scheduler(model, n_slots=max(levels), max_context=args.prompt_tokens + args.max_tokens + 8)
        service = Service(model, scheduler.start(), "bench")
        rows = []
        with BackgroundServer(create_app(service)) as http:
            for clients in levels:  # warm-up: compile every program these batches use
                asyncio.run(run_level(http.url, "bench", args.prompt_tokens, clients, 1, args.max_tokens, 10**6))
            for clients in levels:
                rows.append(asyncio.run(run_level(http.url, "bench", args.prompt_tokens, clients, args.requests,
                                                  args.max_tokens, 0)))
        scheduler.close()
    print(f"\nk2jax-serve, {label}, {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
          f"{max(levels)} slots; prompt {args.prompt_tokens} tokens, max_tokens {args.max_tokens}, "
          f"{args.requests} streaming completions per client\n")
    print("| clients | requests | tokens | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.2f} | {r['tok_s']:.0f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
