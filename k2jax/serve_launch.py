"""k2jax-serve on several hosts: print (or run) the per-host commands for GPU hosts over ssh, or a TPU pod slice.

    python -m k2jax.serve_launch --hosts gpu0,gpu1 -- --model /ckpt --port 8000
    python -m k2jax.serve_launch --tpu my-v5p-64 --zone us-east5-a -- --model /ckpt --port 8000

GPU hosts: process i runs on hosts[i]; hosts[0] is the jax.distributed coordinator and serves HTTP (bound to
127.0.0.1 unless the serve flags say --host). TPU: every worker of the slice runs the same command with
--coordinator auto, and jax.distributed finds the slice's coordinator and process ids itself.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from k2jax.cliargs import Parser, int_in

SERVE = ["python", "-m", "k2jax.serve"]


def ssh_commands(hosts: list[str], coordinator_port: int, serve_args: list[str]) -> list[list[str]]:
    """One `ssh HOST k2jax-serve ...` command per host; process i runs on hosts[i]."""
    coordinator = f"{hosts[0]}:{coordinator_port}"
    return [["ssh", host, shlex.join([*SERVE, "--coordinator", coordinator, "--num-processes", str(len(hosts)),
                                      "--process-id", str(i), *serve_args])] for i, host in enumerate(hosts)]


def tpu_command(name: str, zone: str, project: str | None, serve_args: list[str]) -> list[str]:
    """The gcloud command that starts k2jax-serve on every worker of a TPU pod slice."""
    where = ["--zone", zone, *(["--project", project] if project else [])]
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *where, "--worker=all",
            "--command", shlex.join([*SERVE, "--coordinator", "auto", *serve_args])]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Launcher flags; everything after `--` goes to k2jax-serve on every host."""
    ap = Parser(prog="k2jax-serve-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--hosts", help="comma-separated ssh hosts, process 0 first")
    target.add_argument("--tpu", help="TPU VM name (a pod slice)")
    ap.add_argument("--zone", help="TPU zone (with --tpu)")
    ap.add_argument("--project", default=None, help="GCP project (with --tpu)")
    ap.add_argument("--coordinator-port", type=int_in(1, 65535), default=8476,
                    help="jax.distributed port on the first host")
    ap.add_argument("--run", action="store_true", help="run the commands instead of printing them")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then k2jax-serve flags")
    args = ap.parse_args(argv)
    if args.tpu and not args.zone:
        ap.error("--tpu needs --zone")
    args.serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    return args


def main(argv: list[str] | None = None) -> int:
    """Print the commands, or run them and wait (exit status: the worst of theirs)."""
    args = parse_args(argv)
    if args.hosts:
        commands = ssh_commands(args.hosts.split(","), args.coordinator_port, args.serve_args)
    else:
        commands = [tpu_command(args.tpu, args.zone, args.project, args.serve_args)]
    if not args.run:
        print("\n".join(shlex.join(c) + (" &" if len(commands) > 1 else "") for c in commands))
        return 0
    procs = [subprocess.Popen(c) for c in commands]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
