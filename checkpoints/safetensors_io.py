"""Minimal safetensors access: parse a shard's JSON header, validate it against the file, read one tensor.

The safetensors library's numpy backend cannot return bfloat16, so reads go straight to the bytes the header
points at (ml_dtypes gives numpy a bfloat16). Nothing is ever unpickled: the format is a JSON header and raw
little-endian data.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint is missing a file or tensor, or holds a bad one; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in its shard, and what they hold."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo for one shard; fails on a malformed header or data past the end of the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{file}: header length {header_len} exceeds the file ({size} bytes): truncated?")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{file}: safetensors header is not valid JSON ({err})") from None
    header.pop("__metadata__", None)
    base = 8 + header_len
    return {name: _tensor_info(file, name, entry, base, size) for name, entry in header.items()}


def _tensor_info(file: Path, name: str, entry: dict, base: int, size: int) -> TensorInfo:
    """Validate one header entry (dtype known, offsets match the shape, data inside the file)."""
    try:
        dtype, shape, (begin, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry {entry!r}") from None
    if dtype not in DTYPES:
        raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
    expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
    if stop - begin != expected:
        raise CheckpointError(
            f"{file}: tensor {name!r} spans {stop - begin} bytes, but {dtype}{list(shape)} needs {expected}"
        )
    if base + stop > size:
        raise CheckpointError(
            f"{file}: tensor {name!r} ends at byte {base + stop}, past the end of the file ({size} bytes): "
            "the shard is truncated"
        )
    return TensorInfo(file, name, dtype, shape, base + begin, base + stop)


def read_tensor(info: TensorInfo, out: np.ndarray | None = None) -> np.ndarray:
    """The tensor's data (bfloat16 as ml_dtypes.bfloat16), read into `out` (C-contiguous) or a new array."""
    if out is None:
        out = np.empty(info.shape, DTYPES[info.dtype])
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.start)
        while done < info.nbytes:  # one read returns at most ~2 GiB on Linux
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{info.file}: tensor {info.name!r} is cut short ({done} of {info.nbytes} bytes)")
            done += got
    return out
