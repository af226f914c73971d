"""k2jax-serve: an OpenAI-compatible HTTP server (chat, completions, models, health, metrics) for a Kimi K2 model.

Multi-host: start one process per host with the same flags plus --coordinator HOST:PORT (process 0's address),
--num-processes N and --process-id I, or --coordinator auto where jax.distributed detects the cluster (TPU pod
slices, SLURM); `python -m k2jax.serve_launch` prints or runs those commands. Process 0 serves HTTP and
schedules; the others replay its model calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from k2jax.cliargs import Parser, float_in, int_in, load_model, mesh_spec

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; a malformed or out-of-range one exits with code 2 and one line naming it."""
    ap = Parser(prog="k2jax-serve", description=__doc__)
    ap.add_argument("--model", default=None, help="HF or orbax checkpoint directory (default: the bundled model)")
    ap.add_argument("--mesh", type=mesh_spec, default=None,
                    help='device mesh, e.g. "expert=8" (default: "auto" over the devices of every process)')
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int_in(1, 65535), default=8000)
    ap.add_argument("--max-batch", type=int_in(1), default=8, help="cache slots: sequences decoded together")
    ap.add_argument("--max-context", type=int_in(1), default=None,
                    help="tokens per sequence, prompt plus completion (default: the model's context)")
    ap.add_argument("--kv-pages", type=int_in(1), default=None,
                    help="KV cache pool size in pages (default: every slot at full context); when a smaller pool "
                         "runs out, the newest running request is preempted and resumed later")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="do not share cached prompt prefixes between requests")
    ap.add_argument("--max-queue", type=int_in(1), default=256, help="requests waiting for a slot before 429s")
    ap.add_argument("--prefill-chunk", type=int_in(1), default=512,
                    help="prompt tokens prefilled between decode steps")
    ap.add_argument("--default-max-tokens", type=int_in(1), default=None,
                    help="max_tokens of a chat completion that sets none (default: all the context left)")
    ap.add_argument("--max-body-bytes", type=int_in(1), default=None,
                    help="largest request body accepted, in bytes (default: 8 MiB)")
    ap.add_argument("--no-tool-grammar", action="store_true",
                    help="do not enforce tool calls with a grammar (by default a call can only name a declared tool "
                         "and carry arguments that match its schema)")
    ap.add_argument("--served-model-name", default=None, help="model id clients send (default: the model dir name)")
    ap.add_argument("--api-key", default=os.environ.get("K2JAX_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1 routes (default: $K2JAX_API_KEY, else none)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--coordinator", default=None,
                    help="multi-host: HOST:PORT of process 0's jax.distributed service, or 'auto' (TPU pods, SLURM)")
    ap.add_argument("--num-processes", type=int_in(1), default=1,
                    help="multi-host: number of processes (one per host)")
    ap.add_argument("--process-id", type=int_in(0), default=0, help="multi-host: this process's index (0 serves HTTP)")
    ap.add_argument("--step-timeout", type=float_in(0.0, low_open=True), default=600.0,
                    help="multi-host: seconds a step (broadcast + model call, compiles included) may take before "
                         "the process exits on the assumption that a peer is gone")
    ap.add_argument("--peer-timeout", type=float_in(0.0, low_open=True), default=60.0,
                    help="multi-host: seconds an idle process 0 waits for its peers' answer to a no-op step")
    args = ap.parse_args(argv)
    if args.process_id >= args.num_processes:
        ap.error(f"argument --process-id: must be below --num-processes={args.num_processes}, got {args.process_id}")
    if args.api_key == "":
        ap.error("argument --api-key: must not be empty (leave it out to serve without a key)")
    return args


def start_processes(args: argparse.Namespace) -> None:
    """Join the jax.distributed job of --coordinator (multi-host); the mesh then spans every process's devices."""
    from sharding.mesh import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)


def stop_on_failure(server: Any, scheduler: Any) -> None:
    """Watchdog: shut the HTTP server down once the scheduler has failed (a peer process is gone)."""
    while not server.should_exit:
        if scheduler.failure is not None:
            server.should_exit = True
        time.sleep(0.2)


def exit_now(message: str) -> None:
    """Print and exit with status 1 at once: jax.distributed's exit barrier would wait for the lost peer."""
    print(f"k2jax-serve: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def served_name(args: argparse.Namespace) -> str:
    """The model id: --served-model-name, else the checkpoint directory's name, else 'k2jax'."""
    return args.served_model_name or (Path(args.model).resolve().name if args.model else "k2jax")


def main(argv: list[str] | None = None) -> int:
    """Load the model, start the scheduler thread, serve until interrupted; returns the exit code."""
    args = parse_args(argv)
    import jax
    import uvicorn

    from k2jax.scheduler import STOP, LinkError, Scheduler, StepLink, follow
    from k2jax.api_schema import MAX_BODY_BYTES
    from k2jax.server import GRACEFUL_SHUTDOWN_S, create_app
    from k2jax.service import Service

    if args.host not in LOOPBACK and not args.api_key:
        print(f"k2jax-serve: warning: serving on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    link = None
    try:
        if args.coordinator is not None:
            start_processes(args)
        model = load_model(args.model, args.mesh)
        multi = jax.process_count() > 1
        link = StepLink(args.max_batch, args.prefill_chunk, args.step_timeout, args.peer_timeout) if multi else None
        if jax.process_index() != 0:
            follow(model, args.max_batch, args.max_context, link, num_pages=args.kv_pages,
                   prefix_cache=not args.no_prefix_cache, prefill_chunk=args.prefill_chunk)
            return 0
        scheduler = Scheduler(model, n_slots=args.max_batch, max_context=args.max_context, max_queue=args.max_queue,
                              prefill_chunk=args.prefill_chunk, link=link, num_pages=args.kv_pages,
                              prefix_cache=not args.no_prefix_cache, progress=True)
        service = Service(model, scheduler, served_name(args), args.api_key,
                          args.max_body_bytes or MAX_BODY_BYTES, args.default_max_tokens, not args.no_tool_grammar)
    except (ValueError, FileNotFoundError) as err:
        print(f"k2jax-serve: error: {err}", file=sys.stderr)
        if link is not None:  # the other processes must not wait for steps that will never come
            link.send(STOP)
        return 2
    except LinkError as err:
        exit_now(f"lost process 0: {err}")
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=args.host, port=args.port,
                                           log_level=args.log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    scheduler.start()
    threading.Thread(target=stop_on_failure, args=(server, scheduler), daemon=True).start()
    try:
        server.run()
    finally:
        scheduler.close()
    if scheduler.failure is not None:
        exit_now(f"a peer process failed: {scheduler.failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
