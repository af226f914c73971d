"""orbax checkpoints of k2jax parameters: the fast path for pods, restored straight into any mesh's sharding.

Layout of a k2jax orbax directory: `config.json` (HF form), `params/` (orbax, the nnx.State as a pure dict)
and the tokenizer files. Restoring asks orbax for each array in its target sharding, so every host reads
only its own shards, whatever mesh the checkpoint was saved from.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from checkpoints.hf_writer import copy_tokenizer_files
from checkpoints.model_config import ModelConfig
from checkpoints.safetensors_io import CheckpointError
from sharding.rules import named_sharding


log = logging.getLogger(__name__)
ABANDONED_READ = "_read_array_index_and_device_put"  # orbax's per-shard read coroutine
ABANDONED_ERRORS = ("Encountered error while reading array index", "Error reading ")  # orbax's, TensorStore's
ABANDONED_SETTLE_ROUNDS = 10  # 0.5 s for the reads still running on orbax's threads to end

PARAMS_DIR = "params"
METADATA_FILE = "_METADATA"
MANIFEST_FILE = "manifest.ocdbt"
COMMIT_MARKER = "commit_success.txt"
# Parameters whose trailing columns are padding (kv_a: to the cache's lane count), which checkpoints saved before
# k2jax padded them hold unpadded: they are restored as stored and zero-padded on device.
PADDED_COLUMNS = ("kv_a",)


def _orbax() -> Any:
    """orbax.checkpoint, imported on first use: a quarter second of start-up that HF checkpoints do not need."""
    import orbax.checkpoint

    return orbax.checkpoint


def is_orbax_dir(path: Path) -> bool:
    """Whether `path` is a k2jax orbax checkpoint (rather than a Hugging Face one)."""
    return (path / PARAMS_DIR).is_dir()


def save_orbax(out_dir: Path, cfg: ModelConfig, state: nnx.State, tokenizer_dir: Path | None = None) -> None:
    """Write params (orbax), config.json and the tokenizer files to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with _orbax().StandardCheckpointer() as ckptr:
        ckptr.save((out_dir / PARAMS_DIR).absolute(), nnx.to_pure_dict(state))
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)


def restore_orbax(path: Path, abstract: nnx.State, mesh: Mesh) -> nnx.State:
    """The parameters of an orbax checkpoint, each restored directly into its sharding on `mesh` (into `abstract`).

    A checkpoint with missing or damaged files raises one CheckpointError naming its directory and what is wrong.
    """
    params = (path / PARAMS_DIR).absolute()
    check_orbax_files(params)
    with _orbax().StandardCheckpointer() as ckptr:
        stored = _read(params, "array metadata", lambda: ckptr.metadata(params).item_metadata)
        if stored is None:
            raise CheckpointError(f"{params}: orbax found no array metadata in {METADATA_FILE}")
        flat = nnx.to_flat_state(abstract)
        model = {key: (var.get_value().shape, var.get_metadata()["axes"]) for key, var in flat}
        target = nnx.to_pure_dict(nnx.from_flat_state(
            [(key, var.replace(_target(params, stored.tree, key, var, mesh))) for key, var in flat]))
        restored = _read(params, "array data", lambda: ckptr.restore(params, target))
    nnx.replace_by_pure_dict(abstract, restored)
    for key, var in nnx.to_flat_state(abstract):
        shape, axes = model[key]
        if var.get_value().shape != shape:
            var.set_value(_pad_columns(var.get_value(), shape, named_sharding(axes, shape, mesh)))
    return abstract


def _pad_columns(stored: jax.Array, shape: tuple[int, ...], sharding: jax.sharding.Sharding) -> jax.Array:
    """An array restored without its padding columns, zero-padded to the model's `shape` in its sharding."""
    pad = [(0, 0)] * (stored.ndim - 1) + [(0, shape[-1] - stored.shape[-1])]
    return jax.jit(lambda x: jax.numpy.pad(x, pad), out_shardings=sharding)(stored)


def check_orbax_files(params: Path) -> None:
    """CheckpointError unless the orbax directory has readable metadata and its data manifest; a missing commit
    marker (a save that may not have finished) is a warning."""
    metadata = params / METADATA_FILE
    if not metadata.is_file():
        raise CheckpointError(f"{params}: no {METADATA_FILE}; the orbax checkpoint is incomplete (an unfinished save, "
                              "or deleted files)")
    try:
        tree = json.loads(metadata.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{metadata}: damaged ({err})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("tree_metadata"), dict):
        raise CheckpointError(f"{metadata}: damaged (no tree_metadata object)")
    if tree.get("use_ocdbt", True) and not (params / MANIFEST_FILE).is_file():
        raise CheckpointError(f"{params}: no {MANIFEST_FILE}; the array data of the orbax checkpoint is missing")
    if not (params / COMMIT_MARKER).is_file():
        log.warning("%s: no %s: the save may not have finished; loading it anyway", params, COMMIT_MARKER)


def _read(params: Path, what: str, read: Callable[[], Any]) -> Any:
    """Run an orbax read; any failure but a CheckpointError becomes one CheckpointError naming the directory."""
    _quiet_abandoned_reads()
    try:
        return read()
    except CheckpointError:
        raise
    except Exception as err:  # orbax and TensorStore raise many types; the caller needs one clear error
        detail = str(err).split("See full TensorStore details")[0].strip().splitlines()
        message = (f"{params}: cannot read the {what}, a file there is missing or damaged: "
                   f"{type(err).__name__}: {(detail or [''])[0][:300]}")
    _settle_abandoned_reads()
    raise CheckpointError(message)


def _abandoned(obj: Any, error: BaseException | None) -> bool:
    """Whether an error comes from a read orbax abandoned: its coroutine, its failure, or a callback into its closed
    event loop."""
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    failed_read = error is not None and any(text in str(error) for text in ABANDONED_ERRORS)
    return getattr(obj, "__qualname__", "") == ABANDONED_READ or closed_loop or failed_read


class _DropAbandonedReads(logging.Filter):
    """Drops asyncio's "exception was never retrieved" and concurrent.futures' "exception calling callback" records
    for reads orbax abandoned."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _abandoned(None, record.exc_info[1] if record.exc_info else None)


def _quiet_abandoned_reads() -> None:
    """Orbax abandons its other reads after the first failure; they end on orbax's threads a moment later, racing
    its closed event loop, and would print tracebacks (unraisable or logged) besides the one clear error. Keep those
    out of the user's way from before the first read: the failure itself always reaches the caller as the raised
    CheckpointError. Other unraisable exceptions and log records still get through."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable: Any) -> None:
        if not _abandoned(unraisable.object, unraisable.exc_value):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook
    for name in ("asyncio", "concurrent.futures"):
        logging.getLogger(name).addFilter(_DropAbandonedReads())


def _settle_abandoned_reads() -> None:
    """Collect the reads orbax abandoned while they finish on its threads, before the caller reports the error."""
    for _ in range(ABANDONED_SETTLE_ROUNDS):
        gc.collect()
        time.sleep(0.05)


def _target(params: Path, stored: dict, key: tuple, var: nnx.Variable, mesh: Mesh) -> jax.ShapeDtypeStruct:
    """Shape and dtype as stored (weights keep their precision), sharding from the rules for this mesh."""
    node = stored
    for part in key:
        if not isinstance(node, dict) or part not in node:
            raise CheckpointError(f"{params}: no array {'/'.join(map(str, key))}")
        node = node[part]
    shape = var.get_value().shape
    if key[-1] in PADDED_COLUMNS and tuple(node.shape[:-1]) == tuple(shape[:-1]) and node.shape[-1] < shape[-1]:
        shape = tuple(node.shape)
    if tuple(node.shape) != tuple(shape):
        raise CheckpointError(f"{params}: array {'/'.join(map(str, key))} has shape {tuple(node.shape)}, but "
                              f"config.json implies {tuple(shape)}")
    return jax.ShapeDtypeStruct(shape, node.dtype, sharding=named_sharding(var.get_metadata()["axes"], shape, mesh))
