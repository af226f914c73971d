"""k2jax: Kimi K2 Thinking in JAX."""

import os as _os


def _describe_no_tpu_host() -> None:
    """On a host without TPU chips, tell libtpu it is one host, so loading it prints no start-up errors.

    libtpu is loaded when JAX probes its backends or builds an AOT topology; with no TPU it cannot find its
    host bounds and worker names and prints six lines of errors. Set variables are left as they are. The chip
    count comes from a private jax helper: a jax without it only gets those lines back.
    """
    try:
        from jax._src.hardware_utils import num_available_tpu_chips_and_device_id as tpu_chips
    except ImportError:
        return
    if tpu_chips()[0] == 0:
        _os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
        _os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


_describe_no_tpu_host()

from k2jax.config import K2Config, preset  # noqa: E402 - libtpu's variables first
from k2jax.llm import GenerateOutput, Model  # noqa: E402
from k2jax.loading import load  # noqa: E402

__all__ = ["GenerateOutput", "K2Config", "Model", "load", "preset"]
