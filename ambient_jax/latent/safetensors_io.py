"""Reading and writing the safetensors format with numpy alone (lazy, memory-mapped).

The format is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` and the
raw little-endian bytes. We read it ourselves rather than through `safetensors.numpy`
because that package cannot hand bfloat16 tensors to numpy (the dtype most fine-tuned
checkpoints and LoRA files use) and because a memory map lets a loader copy one tensor,
or one shard of one tensor, at a time onto devices: a 2.6 B-parameter UNet never needs a
full copy in host memory. `tests/test_latent_weights.py` checks both directions against
the `safetensors` package itself.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Iterator

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class SafetensorsFile(Mapping):
  """A read-only mapping name -> np.ndarray (a view into a memory map; nothing read until used)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ValueError(f"{self.path} is not a safetensors file (shorter than 8 bytes).")
      (length,) = struct.unpack("<Q", raw)
      if length > _MAX_HEADER:
        raise ValueError(f"{self.path} is not a safetensors file (header length {length}).")
      try:
        header = json.loads(f.read(length))
      except json.JSONDecodeError as e:
        raise ValueError(f"{self.path} is not a safetensors file (bad header: {e}).") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._entries = header
    self._start = 8 + length
    self._map = None

  def _data(self) -> np.memmap:
    if self._map is None:
      size = os.path.getsize(self.path) - self._start
      self._map = (np.memmap(self.path, np.uint8, "r", offset=self._start, shape=(size,))
                   if size else np.zeros((0,), np.uint8))
    return self._map

  def __getitem__(self, name: str) -> np.ndarray:
    entry = self._entries[name]
    if entry["dtype"] not in DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has dtype {entry['dtype']}, which is not "
                       f"supported (supported: {sorted(DTYPES)}).")
    begin, end = entry["data_offsets"]
    dtype = np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<")
    return self._data()[begin:end].view(dtype).reshape(entry["shape"])

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (name -> array) as one safetensors file, names sorted, atomically."""
  header, offset = {}, 0
  arrays = {}
  for name in sorted(tensors):
    a = np.ascontiguousarray(np.asarray(tensors[name]))
    if a.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot store.")
    arrays[name] = a.astype(a.dtype.newbyteorder("<"), copy=False)
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does.
  tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays.values():
      f.write(a.tobytes())
  os.replace(tmp, path)
