"""Write k2jax parameters as a K2-format Hugging Face checkpoint (the inverse of the reader, same name table).

Output: `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` (a lone larger tensor gets a
shard of its own), `model.safetensors.index.json`, `config.json` (with quantization_config when the
experts are INT4) and the tokenizer files. INT4 experts are written as compressed-tensors pack-quantized
`weight_packed` / `weight_scale` / `weight_shape`, one set per expert.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from checkpoints.hf_names import Source, int4_shape_name, sources
from checkpoints.hf_reader import INDEX_FILE
from checkpoints.model_config import ModelConfig


TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "tokenization_kimi.py", "generation_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
SHAPE_DTYPE = np.int64  # compressed-tensors stores weight_shape as torch.tensor(weight.shape): int64


def write_hf_checkpoint(out_dir: str | Path, cfg: ModelConfig, state: nnx.State, tokenizer_dir: str | Path | None = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write `state` (k2jax parameters, as from k2jax.loading) as a K2-format HF checkpoint in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {tuple(str(k) for k in key): var.get_value() for key, var in nnx.to_flat_state(state)}
    table = sources(cfg)
    expected = {src.path for src in table}
    if set(params) != expected:
        raise ValueError(f"state does not match the config: missing {sorted(map('/'.join, expected - set(params)))}, "
                         f"unexpected {sorted(map('/'.join, set(params) - expected))}")
    units = _units(table, params)
    shards = _split(units, max_shard_bytes)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(_tensors(table, params, set(names))), str(out_dir / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
    index = {"metadata": {"total_size": sum(size for _, size in units)},
             "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), out_dir)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy whichever tokenizer files `src` has (tiktoken.model, tokenizer_config.json, chat template, ...)."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: tokenizer directory does not exist")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _units(table: list[Source], params: dict) -> list[tuple[list[str], int]]:
    """(HF tensor names, bytes) in writing order, each tensor once (parameters may share one); an INT4
    weight_packed and its weight_shape form one unit."""
    units, seen = [], set()
    for src in table:
        value = params[src.path]
        inner = value.shape[len(src.stack_shape):]
        per = int(np.prod(src.hf_shape(inner), dtype=np.int64)) * (4 if src.int4 else value.dtype.itemsize)
        for name in src.names():
            if name in seen:
                continue
            seen.add(name)
            if src.int4:
                units.append(([name, int4_shape_name(name)], per + 2 * np.dtype(SHAPE_DTYPE).itemsize))
            else:
                units.append(([name], per))
    return units


def _split(units: list[tuple[list[str], int]], max_bytes: int) -> list[list[str]]:
    """Consecutive units grouped into shards of at most max_bytes (a larger unit alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for names, size in units:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].extend(names)
        used += size
    return shards


def _tensors(table: list[Source], params: dict, names: set[str]) -> Iterator[tuple[str, np.ndarray]]:
    """The HF tensors among `names`, converted from their k2jax parameters (one parameter on host at a time; a
    tensor that several parameters share is yielded once all of them have filled it)."""
    owners: dict[str, int] = {}
    for src in table:
        for name in src.names():
            owners[name] = owners.get(name, 0) + 1
    partial: dict[str, np.ndarray] = {}
    for src in table:
        wanted = [(pos, name) for pos, name in zip(np.ndindex(*src.stack_shape), src.names()) if name in names]
        if not wanted:
            continue
        value = np.asarray(params[src.path])
        for pos, name in wanted:
            hf = src.to_hf(value[pos], partial.get(name))
            owners[name] -= 1
            if owners[name]:
                partial[name] = hf
                continue
            partial.pop(name, None)
            yield name, hf
            if src.int4:
                yield int4_shape_name(name), np.array([hf.shape[0], hf.shape[1] * 8], SHAPE_DTYPE)

