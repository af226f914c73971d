"""Agent loop with prefix reuse vs naive re-prefill: cumulative prefill tokens and wall time over many steps.

One conversation of demo tool tasks (k2jax.chat_cli's tools) runs for `--steps` model turns twice, greedy, in a
slot of `--capacity` tokens: once with the prefix cache (each step prefills what differs from the pages the
previous steps left, from the last whole page they share), once re-prefilling the whole prompt every step. Each
mode runs once untimed (compiling every shape it meets), then timed. Prints a markdown table: cumulative figures at
checkpoints, then totals.

    python benchmarks/agent.py [--model DIR] [--steps 300] [--capacity 4096] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

import k2jax
from k2jax.agent import Agent, StepStats
from k2jax.chat_cli import DEMO_TOOLS, demo_task
from k2jax.llm import Model


def run(model: Model, steps: int, capacity: int, max_new_tokens: int, reuse: bool) -> list[StepStats]:
    """Step stats of a `steps`-turn conversation of demo tasks (each task gets at most 4 turns)."""
    agent = Agent(model, DEMO_TOOLS, max_new_tokens=max_new_tokens, capacity=capacity, reuse=reuse)
    task = 0
    while len(agent.steps) < steps:
        agent.run(demo_task(task), max_steps=min(4, steps - len(agent.steps)))
        task += 1
    return agent.steps


def checkpoints(steps: int) -> list[int]:
    """Step counts at which cumulative figures are printed: six even marks."""
    return sorted({max(1, steps * k // 6) for k in range(1, 7)})


def table(runs: dict[str, list[StepStats]]) -> str:
    """Markdown: cumulative prefilled tokens and seconds at checkpoints, then per-mode totals."""
    reuse, naive = runs["reuse"], runs["naive"]
    lines = ["| steps | prompt tokens (sum) | prefilled, reuse | prefilled, naive | s, reuse | s, naive |",
             "|---:|---:|---:|---:|---:|---:|"]
    for n in checkpoints(len(reuse)):
        prefilled = [sum(s.prefilled_tokens for s in stats[:n]) for stats in (reuse, naive)]
        seconds = [sum(s.seconds for s in stats[:n]) for stats in (reuse, naive)]
        lines.append(f"| {n} | {sum(s.prompt_tokens for s in naive[:n])} | {prefilled[0]} | {prefilled[1]} "
                     f"| {seconds[0]:.1f} | {seconds[1]:.1f} |")
    lines += ["", ("| mode | steps | tool calls | evictions | prefilled / step (mean, max) | generated | wall s "
                   "| s / step |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, stats in runs.items():
        prefilled = np.array([s.prefilled_tokens for s in stats])
        wall = sum(s.seconds for s in stats)
        lines.append(f"| {mode} | {len(stats)} | {sum(s.tool_calls for s in stats)} "
                     f"| {sum(s.evicted_messages > 0 for s in stats)} | {prefilled.mean():.0f}, {prefilled.max()} "
                     f"| {sum(s.generated_tokens for s in stats)} | {wall:.1f} | {wall / len(stats):.3f} |")
    return "\n".join(lines)


def main() -> None:
    """Run both modes, each once to compile and once timed, and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    model = k2jax.load(args.model)
    began = time.perf_counter()
    runs = {}
    for mode in ("reuse", "naive"):
        run(model, args.steps, args.capacity, args.max_new_tokens, mode == "reuse")  # compiles every shape it meets
        print(f"{mode}: warm-up done at {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        runs[mode] = run(model, args.steps, args.capacity, args.max_new_tokens, mode == "reuse")
    print(table(runs))
    print(f"\n{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, slot capacity "
          f"{args.capacity}, max_new_tokens {args.max_new_tokens}, {jax.default_backend()}; "
          f"benchmark total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
