"""k2jax-serve: an OpenAI-compatible HTTP server (chat, completions, models, health, metrics) for a Kimi K2 model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; argparse exits with code 2 on malformed ones."""
    ap = argparse.ArgumentParser(prog="k2jax-serve", description=__doc__)
    ap.add_argument("--model", default=None, help="HF or orbax checkpoint directory (default: the bundled model)")
    ap.add_argument("--mesh", default=None, help='device mesh, e.g. "expert=8" (default: all local devices)')
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=8, help="cache slots: sequences decoded together")
    ap.add_argument("--max-context", type=int, default=None,
                    help="tokens per sequence, prompt plus completion (default: the model's context)")
    ap.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429s")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled between decode steps")
    ap.add_argument("--served-model-name", default=None, help="model id clients send (default: the model dir name)")
    ap.add_argument("--api-key", default=os.environ.get("K2JAX_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1 routes (default: $K2JAX_API_KEY, else none)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap.parse_args(argv)


def served_name(args: argparse.Namespace) -> str:
    """The model id: --served-model-name, else the checkpoint directory's name, else 'k2jax'."""
    return args.served_model_name or (Path(args.model).resolve().name if args.model else "k2jax")


def main(argv: list[str] | None = None) -> int:
    """Load the model, start the scheduler thread, serve until interrupted; returns the exit code."""
    args = parse_args(argv)
    import uvicorn

    import k2jax
    from k2jax.scheduler import Scheduler
    from k2jax.server import GRACEFUL_SHUTDOWN_S, Service, create_app

    try:
        model = k2jax.load(args.model, mesh=args.mesh)
        scheduler = Scheduler(model, n_slots=args.max_batch, max_context=args.max_context, max_queue=args.max_queue,
                              prefill_chunk=args.prefill_chunk)
        service = Service(model, scheduler, served_name(args), args.api_key)
    except (ValueError, FileNotFoundError) as err:
        print(f"k2jax-serve: error: {err}", file=sys.stderr)
        return 2
    scheduler.start()
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    finally:
        scheduler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
