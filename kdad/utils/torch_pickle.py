"""Read PyTorch checkpoint files into numpy arrays without importing torch.

Two on-disk formats are understood:

* **zip** (``torch.save`` since 1.6): an archive ``<prefix>/data.pkl`` holding the object pickle and
  ``<prefix>/data/<key>`` holding each storage's raw bytes (byte order from ``<prefix>/byteorder``,
  little-endian when absent).
* **legacy** (before 1.6): five concatenated pickles-and-blobs in one stream: the magic number, the
  protocol version (1001), a ``sys_info`` dict, the object pickle, the list of storage keys, then for
  each key in that order an 8-byte little-endian element count followed by the storage's raw
  little-endian elements.

In both, tensors are pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
and storages are persistent ids ``('storage', storage_type, key, location, numel[, view])``. The
unpickler below allow-lists exactly the globals a state dict needs (``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2``, ``torch._utils._rebuild_parameter`` and the typed
``torch.*Storage`` classes); anything else is refused with an error naming the file, so loading an
untrusted file cannot run code. Tensors become C-contiguous numpy arrays in native byte order
(``bfloat16`` becomes ``float32``, numpy having no bfloat16).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import IO, Any, Dict, List, Optional, Tuple

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# storage class name -> element dtype as stored on disk ("bfloat16" is read as uint16 bits).
STORAGE_DTYPES: Dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class TorchPickleError(ValueError):
    """A checkpoint that cannot (or may not) be read."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class found in the pickle."""

    name: str

    @property
    def disk_dtype(self) -> str:
        return STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    """A storage named in the pickle; ``data`` (1-D, native order) is filled in after unpickling."""

    key: str
    storage_type: _StorageType
    numel: int
    data: Optional[np.ndarray] = None


@dataclass
class _StorageView:
    """Legacy storage view: ``numel`` elements of ``base`` starting at element ``offset``."""

    base: _Storage
    offset: int
    numel: int


@dataclass
class _PendingTensor:
    """``_rebuild_tensor_v2`` arguments, turned into an array once the storage data is known."""

    storage: Any
    offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, *_: Any) -> _PendingTensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (requires_grad, hooks, metadata ignored)."""
    return _PendingTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                          tuple(int(s) for s in stride))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """Stand-in for ``torch._utils._rebuild_parameter``: a parameter is just its data."""
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _NoGlobalsUnpickler(pickle.Unpickler):
    """For the plain header pickles of the legacy format: no globals at all."""

    def __init__(self, file: IO[bytes], path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise TorchPickleError(f"'{self._path}': unexpected global '{module}.{name}' in a header pickle")


class _CheckpointUnpickler(pickle.Unpickler):
    """Unpickler with an allow-list of globals and torch's storage persistent ids."""

    def __init__(self, file: IO[bytes], path: str, storages: Dict[str, _Storage]) -> None:
        super().__init__(file)
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchPickleError(
            f"'{self._path}': the checkpoint uses '{module}.{name}', which this torch-free reader does "
            "not allow (only state dicts of plain tensors are supported; save model.state_dict())"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise TorchPickleError(f"'{self._path}': malformed persistent id {pid!r}")
        if pid[0] != "storage":
            raise TorchPickleError(
                f"'{self._path}': persistent id of kind {pid[0]!r} is not supported "
                "(whole pickled modules cannot be read; save model.state_dict())"
            )
        data = pid[1:]
        if len(data) not in (4, 5):
            raise TorchPickleError(f"'{self._path}': malformed storage persistent id {pid!r}")
        storage_type, key, _location, numel = data[:4]
        view = data[4] if len(data) == 5 else None
        if not isinstance(storage_type, _StorageType):
            raise TorchPickleError(f"'{self._path}': storage {key!r} has unknown type {storage_type!r}")
        key = str(key)
        storage = self._storages.get(key)
        if storage is None:
            storage = _Storage(key, storage_type, int(numel))
            self._storages[key] = storage
        elif storage.storage_type != storage_type or storage.numel != int(numel):
            raise TorchPickleError(f"'{self._path}': storage {key!r} is described inconsistently")
        if view is None:
            return storage
        _view_key, offset, view_numel = view
        return _StorageView(storage, int(offset), int(view_numel))


def _to_native(raw: bytes, storage: _Storage, little_endian: bool, path: str) -> np.ndarray:
    """Decode ``storage.numel`` elements of ``raw`` into a 1-D native-order array."""
    disk = np.dtype(storage.storage_type.disk_dtype).newbyteorder("<" if little_endian else ">")
    needed = storage.numel * disk.itemsize
    if len(raw) < needed:
        raise TorchPickleError(
            f"'{path}': storage {storage.key!r} is truncated ({len(raw)} bytes, expected {needed})"
        )
    values = np.frombuffer(raw, dtype=disk, count=storage.numel)
    if storage.storage_type.name == "BFloat16Storage":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(disk.newbyteorder("="))


def _tensor_to_array(pending: _PendingTensor, path: str) -> np.ndarray:
    """Apply ``(offset, size, stride)`` to the storage like ``Tensor.set_``, then copy."""
    storage, offset = pending.storage, pending.offset
    view = storage if isinstance(storage, _StorageView) else None
    if view is not None:
        storage = view.base
    if storage.data is None:
        raise TorchPickleError(f"'{path}': storage {storage.key!r} has no data")
    flat = storage.data
    if view is not None:
        if view.offset < 0 or view.numel < 0 or view.offset + view.numel > flat.size:
            raise TorchPickleError(f"'{path}': view of storage {storage.key!r} is out of bounds")
        flat = flat[view.offset: view.offset + view.numel]
    size, stride = pending.size, pending.stride
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
        raise TorchPickleError(f"'{path}': invalid tensor geometry size={size} stride={stride}")
    if any(s == 0 for s in size):
        return np.zeros(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise TorchPickleError(
            f"'{path}': tensor (offset {offset}, size {size}, stride {stride}) exceeds its storage "
            f"{storage.key!r} of {flat.size} elements"
        )
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.array(view, copy=True, order="C")


def _resolve(obj: Any, path: str) -> Any:
    """Replace every pending tensor inside dicts, lists and tuples with its array."""
    if isinstance(obj, _PendingTensor):
        return _tensor_to_array(obj, path)
    if isinstance(obj, dict):
        for key in list(obj):
            obj[key] = _resolve(obj[key], path)
        return obj
    if isinstance(obj, list):
        return [_resolve(item, path) for item in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(item, path) for item in obj)
    if isinstance(obj, (_Storage, _StorageView, _StorageType)):
        raise TorchPickleError(f"'{path}': bare storages are not supported, only tensors")
    return obj


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name == "data.pkl" or name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise TorchPickleError(f"'{path}': zip file without exactly one 'data.pkl' (not a torch file?)")
        prefix = pickles[0][: -len("data.pkl")]
        little_endian = True
        if f"{prefix}byteorder" in names:
            order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise TorchPickleError(f"'{path}': unknown byte order {order!r}")
            little_endian = order == "little"
        storages: Dict[str, _Storage] = {}
        result = _CheckpointUnpickler(io.BytesIO(archive.read(pickles[0])), path, storages).load()
        for key, storage in storages.items():
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise TorchPickleError(f"'{path}': storage record '{entry}' is missing")
            storage.data = _to_native(archive.read(entry), storage, little_endian, path)
    return result


def _load_legacy(handle: IO[bytes], path: str) -> Any:
    magic = _NoGlobalsUnpickler(handle, path).load()
    if magic != LEGACY_MAGIC_NUMBER:
        raise TorchPickleError(f"'{path}': not a PyTorch checkpoint (bad magic number)")
    protocol = _NoGlobalsUnpickler(handle, path).load()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise TorchPickleError(f"'{path}': unsupported legacy protocol version {protocol!r}")
    sys_info = _NoGlobalsUnpickler(handle, path).load()
    little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    storages: Dict[str, _Storage] = {}
    result = _CheckpointUnpickler(handle, path, storages).load()
    keys: List[Any] = _NoGlobalsUnpickler(handle, path).load()
    if not isinstance(keys, list):
        raise TorchPickleError(f"'{path}': malformed storage key list")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise TorchPickleError(f"'{path}': storage {key!r} is listed but never used")
        header = handle.read(8)
        if len(header) != 8:
            raise TorchPickleError(f"'{path}': file ends before storage {key!r}")
        numel = int.from_bytes(header, "little", signed=True)
        if numel != storage.numel:
            raise TorchPickleError(
                f"'{path}': storage {key!r} holds {numel} elements, the pickle says {storage.numel}"
            )
        itemsize = np.dtype(storage.storage_type.disk_dtype).itemsize
        storage.data = _to_native(handle.read(numel * itemsize), storage, little_endian, path)
    return result


def load_torch_pickle(path: str) -> Any:
    """Load a ``torch.save`` file (zip or legacy) with tensors as numpy arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint '{path}' does not exist")
    try:
        if zipfile.is_zipfile(path):
            result = _load_zip(path)
        else:
            with open(path, "rb") as handle:
                result = _load_legacy(handle, path)
        return _resolve(result, path)
    except TorchPickleError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, KeyError,
            AttributeError, IndexError) as error:
        raise TorchPickleError(f"'{path}': cannot read PyTorch checkpoint: {error}") from error


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Read a PyTorch state dict file into ``{name: array}`` (keys in file order).

    A checkpoint dict wrapping the weights under ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    obj = load_torch_pickle(path)
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise TorchPickleError(f"'{path}': expected a state dict, found {type(obj).__name__}")
    state: Dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise TorchPickleError(f"'{path}': entry {key!r} is a {type(value).__name__}, not a tensor")
        state[str(key)] = value
    return state
