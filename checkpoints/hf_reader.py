"""Read a Hugging Face Kimi K2 / DeepseekV3 checkpoint (bf16/fp32, or compressed-tensors INT4 experts).

Opening a checkpoint parses every shard's header only; `plan` then checks every tensor the config calls for
(present, shape, dtype, no strays) before a byte of weight data is read, so a bad checkpoint fails fast.
`read_block` reads the HF tensors behind one block of one k2jax parameter, as a device's shard needs it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from checkpoints.hf_names import Source, int4_shape_name, sources
from checkpoints.model_config import ModelConfig
from checkpoints.safetensors_io import DTYPES, CheckpointError, TensorInfo, read_header, read_tensor


INDEX_FILE = "model.safetensors.index.json"
GROUP_BYTES = 32 << 20  # HF bytes read and converted at once
Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """One k2jax parameter to assemble: its source, full shape, k2jax dtype, logical axes, stored bytes."""

    key: tuple[str, ...]
    source: Source
    shape: tuple[int, ...]
    dtype: np.dtype
    axes: tuple[str | None, ...]
    hf_bytes: int

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one HF tensor of this parameter (all of its tensors are alike)."""
        return self.hf_bytes // int(np.prod(self.source.stack_shape, dtype=np.int64))


def open_checkpoint(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo over all shards (index or lone files); checks index and headers agree."""
    index = path / INDEX_FILE
    if not index.exists():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no {INDEX_FILE} and no *.safetensors files")
        return {name: info for file in files for name, info in read_header(file).items()}
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({err!r})") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{index}: names shard file(s) that do not exist: {', '.join(missing)}")
    headers = {f: read_header(path / f) for f in files}
    out = {}
    for name, file in weight_map.items():
        if name not in headers[file]:
            raise CheckpointError(f"{index}: maps tensor {name!r} to {path / file}, which does not hold it")
        out[name] = headers[file][name]
    return out


def plan(path: Path, tensors: dict[str, TensorInfo], cfg: ModelConfig,
         params: dict[tuple[str, ...], tuple[tuple[int, ...], tuple[str | None, ...]]]) -> list[ParamPlan]:
    """Check every tensor behind `params` (k2jax path -> (shape, axes)) and return the read plan."""
    by_path = {src.path: src for src in sources(cfg)}
    unknown = sorted("/".join(p) for p in params if p not in by_path)
    if unknown:
        raise CheckpointError(f"{path}: no HF source for k2jax parameters {unknown}")
    where = path / INDEX_FILE if (path / INDEX_FILE).exists() else path
    plans = [_plan_param(where, tensors, by_path[key], shape, axes) for key, (shape, axes) in params.items()]
    used = {n for p in plans for n in p.source.names()}
    used |= {int4_shape_name(n) for p in plans if p.source.int4 for n in p.source.names()}
    strays = sorted(set(tensors) - used)
    if strays:
        raise CheckpointError(_stray_message(path, tensors, strays))
    return plans


def _plan_param(where: Path, tensors: dict[str, TensorInfo], src: Source, shape: tuple[int, ...],
                axes: tuple[str | None, ...]) -> ParamPlan:
    """Check presence, shape and dtype of every HF tensor of one parameter (`where` names the index or dir)."""
    stack = src.stack_shape
    inner = shape[len(stack):]
    expected = src.hf_shape(inner)
    param = "/".join(src.path)
    first: TensorInfo | None = None
    total = 0
    for name in src.names():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"{where}: no tensor {name!r} (needed for k2jax parameter {param})"
                                  + _missing_hint(tensors, name))
        if info.dtype not in src.dtypes:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected "
                                  f"{' or '.join(src.dtypes)}")
        if info.shape != expected:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, but config.json "
                                  f"implies {list(expected)} (k2jax parameter {param})")
        if first is not None and info.dtype != first.dtype:
            raise CheckpointError(f"{info.file}: tensor {name!r} is {info.dtype} but {first.name!r} is "
                                  f"{first.dtype}; the tensors of k2jax parameter {param} must share a dtype")
        if src.int4:
            _check_shape_tensor(tensors, name)
        first = first or info
        total += info.nbytes
    return ParamPlan(src.path, src, tuple(shape), src.k2_dtype(first.dtype), tuple(axes), total)


def _check_shape_tensor(tensors: dict[str, TensorInfo], packed_name: str) -> None:
    """A weight_packed tensor needs its integer weight_shape [2] beside it."""
    name = int4_shape_name(packed_name)
    info = tensors.get(name)
    if info is None:
        raise CheckpointError(f"{tensors[packed_name].file}: no tensor {name!r} beside {packed_name!r}")
    if not info.dtype.startswith("I") or info.shape != (2,):
        raise CheckpointError(f"{info.file}: tensor {name!r} is {info.dtype}{list(info.shape)}, expected an "
                              "integer [2] (out, in)")


def _missing_hint(tensors: dict[str, TensorInfo], name: str) -> str:
    """Explain a missing expert tensor when the checkpoint holds it in the other (quantized or dense) form."""
    if name.endswith(".weight_packed") and name.removesuffix("_packed") in tensors:
        return "; the checkpoint stores this expert unquantized but config.json has a quantization_config"
    if name.endswith(".weight") and name + "_packed" in tensors:
        return "; the checkpoint stores this expert INT4 (weight_packed) but config.json has no quantization_config"
    return ""


def _stray_message(path: Path, tensors: dict[str, TensorInfo], strays: list[str]) -> str:
    """Error text for tensors that the config does not account for."""
    zero_points = [s for s in strays if s.endswith(".weight_zero_point")]
    name = (zero_points or strays)[0]
    head = f"{tensors[name].file}: tensor {name!r}"
    if zero_points:
        return f"{head}: zero points (asymmetric quantization) are not supported; k2jax reads symmetric INT4"
    return (f"{head} is not described by config.json ({len(strays)} such tensors in {path}); "
            "does num_hidden_layers / n_routed_experts / tie_word_embeddings match the checkpoint?")


def read_block(tensors: dict[str, TensorInfo], p: ParamPlan, index: Index,
               on_read: Callable[[int], None]) -> np.ndarray:
    """The block `index` of parameter `p`: reads only the HF tensors of the stack positions it covers.

    Tensors are read and converted in groups of about GROUP_BYTES (many experts at once for the INT4
    repacking), so host memory beyond the block itself stays at a few groups.
    """
    src = p.source
    n = len(src.stack_shape)
    ranges = [range(size)[s] for size, s in zip(src.stack_shape, index[:n])]
    positions = list(itertools.product(*ranges))
    hf_shape = src.hf_shape(p.shape[n:])
    hf_dtype = DTYPES[tensors[src.names()[0]].dtype]
    group = max(1, GROUP_BYTES // p.tensor_bytes)
    out = None
    for start in range(0, len(positions), group):
        batch = positions[start:start + group]
        hf = np.empty((len(batch), *hf_shape), hf_dtype)
        for j, pos in enumerate(batch):
            info = tensors[src.name_at(pos)]
            read_tensor(info, out=hf[j])
            on_read(info.nbytes)
            if src.int4:
                _check_shape_values(tensors, info.name, hf_shape)
        part = src.to_k2(hf)[(slice(None), *index[n:])]
        if out is None:
            out = np.empty((len(positions), *part.shape[1:]), p.dtype)
        out[start:start + len(batch)] = part
    return out.reshape(*(len(r) for r in ranges), *out.shape[1:])


def _check_shape_values(tensors: dict[str, TensorInfo], packed_name: str, hf_shape: tuple[int, int]) -> None:
    """weight_shape must say [out, in] of the unpacked matrix."""
    info = tensors[int4_shape_name(packed_name)]
    got = read_tensor(info).tolist()
    want = [hf_shape[0], hf_shape[1] * 8]
    if got != want:
        raise CheckpointError(f"{info.file}: tensor {info.name!r} says {got}, but config.json implies {want}")
