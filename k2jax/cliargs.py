"""Shared command-line pieces of the k2jax CLIs: a parser whose errors are one line, range-checked value types,
and model loading whose errors name --mesh or --model. A bad flag exits with status 2 and one line naming it."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, NoReturn

SEED_MAX = 2**32 - 1  # the sampler keys on 32-bit seeds
TOP_K_MAX = 2**31 - 1  # the sampler holds top-k as int32


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports a bad flag in one line (no usage block) and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when high is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (or (low, high] when low_open)."""
    interval = f"in {'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else \
        f"{'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = low < value if low_open else low <= value
        if not (math.isfinite(value) and above and value <= high):
            raise argparse.ArgumentTypeError(f"must be a finite number {interval}, got {text}")
        return value

    return parse


def mesh_spec(text: str) -> str:
    """An argparse type: "auto" or a mesh spec that sharding.mesh.parse_spec accepts."""
    from sharding.mesh import parse_spec

    if text != "auto":
        try:
            parse_spec(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return text


def non_empty(text: str) -> str:
    """An argparse type: a non-empty string."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def add_sampling_flags(ap: argparse.ArgumentParser, min_p: bool = True) -> None:
    """--temperature, --top-p, --top-k, (--min-p) and --seed, each range-checked."""
    ap.add_argument("--temperature", type=float_in(0.0), default=0.0, help="0 samples greedily")
    ap.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=1.0)
    ap.add_argument("--top-k", type=int_in(0, TOP_K_MAX), default=0, help="0 disables top-k")
    if min_p:
        ap.add_argument("--min-p", type=float_in(0.0, 1.0), default=0.0)
    ap.add_argument("--seed", type=int_in(0, SEED_MAX), default=0)


def load_model(path: str | None, mesh: str | None) -> Any:
    """k2jax.load for a CLI: a mesh the devices cannot form raises ValueError naming --mesh, a checkpoint that cannot
    be loaded one naming --model."""
    import k2jax
    from sharding.mesh import make_mesh

    if mesh not in (None, "auto"):
        try:
            mesh = make_mesh(mesh)
        except ValueError as err:
            raise ValueError(f"--mesh {mesh}: {err}") from None
    try:
        return k2jax.load(path, mesh=mesh)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"{'--model ' + path if path is not None else 'the bundled model'}: {err}") from None
