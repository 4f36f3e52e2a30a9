"""Lazy read access to a checkpoint's tensors (docs/reliability.md, "Inputs").

:class:`StateFile` opens a ``.safetensors`` file without reading its tensors (a pickle ``.ckpt``/``.pt``
only through ``torch.load(weights_only=True)``, :func:`.safe_io.load_plain_pickle`); :class:`DictState`
gives in-memory tensors (a host's weights) the same interface, so the key-layout inference
(:mod:`.layouts`) and the model builder (:mod:`.model_io`) read both alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import WeightsmithError
from .naming import CheckpointSlot
from .safe_io import PICKLE_SUFFIXES, check_input, load_plain_pickle


class StateFile:
    """Lazy read access to a checkpoint's tensors.

    ``mapped=False`` (Flux's multi-GB files): each tensor is read with a plain positioned read instead of
    through the file's memory map, so the pages read do not stay in the process's resident memory
    (reading a 9.5 GB T5 file through the map leaves 9.5 GB resident; docs/flux.md, "How Weightsmith
    holds a Flux model")."""

    def __init__(self, path: Path, mapped: bool = True):
        self.path = path
        self.metadata: dict = {}
        self._index = None
        check_input(path, "the model file")
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._f = safe_open(str(path), framework="pt")
                self.metadata = self._f.metadata() or {}
                self._keys = list(self._f.keys())
                self._keyset = set(self._keys)
                if not mapped:
                    self._index = _safetensors_index(path)
            except Exception as e:
                raise WeightsmithError(
                    f"{path} is not a readable .safetensors file ({type(e).__name__}: {e}). The file is "
                    "corrupt or truncated: download or export it again."
                ) from None
            self._sd = None
        elif suffix in PICKLE_SUFFIXES:
            self._sd = load_plain_pickle(path, str(path))
            self._keys = list(self._sd)
        else:
            raise WeightsmithError(
                f"{path}: unsupported file type {suffix!r}. Pass a .safetensors checkpoint or a diffusers folder."
            )

    def keys(self):
        return self._keys

    def get(self, key: str) -> torch.Tensor:
        if self._sd is not None:
            return self._sd[key]
        if key not in self._keyset:
            raise KeyError(key)
        if self._index is not None:
            return _read_unmapped(self.path, self._index, key)
        return self._f.get_tensor(key)

    def shape(self, key: str) -> tuple:
        if self._sd is not None:
            return tuple(self._sd[key].shape)
        if key not in self._keyset:
            raise KeyError(key)
        return tuple(self._f.get_slice(key).get_shape())


_ST_TORCH = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def _safetensors_index(path: Path) -> dict:
    """key -> (torch dtype, shape, first byte, end byte) from a safetensors header."""
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = (getattr(torch, _ST_TORCH[v["dtype"]]), tuple(v["shape"]), 8 + n + a, 8 + n + b)
    return out


def _read_unmapped(path: Path, index: dict, key: str) -> torch.Tensor:
    dtype, shape, a, b = index[key]
    buf = bytearray(b - a)
    with open(path, "rb", buffering=0) as f:
        f.seek(a)
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                raise WeightsmithError(f"{path} is truncated (tensor {key}); download or export it again.")
            got += n
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


class DictState:
    """In-memory tensors with the same read interface as :class:`StateFile`."""

    def __init__(self, tensors: dict, metadata: dict | None = None):
        self._t = tensors
        self.metadata = metadata or {}
        self.path = None

    def keys(self):
        return list(self._t)

    def get(self, key):
        return self._t[key]

    def shape(self, key):
        return tuple(self._t[key].shape)


def read_slot(sf, slot: CheckpointSlot) -> torch.Tensor:
    """The tensor a :class:`~.naming.CheckpointSlot` names (its rows of a fused tensor, transposed
    where the layout stores it so); KeyError when the state has no such key."""
    if slot.key not in set(sf.keys()):
        raise KeyError(slot.key)
    t = sf.get(slot.key)
    if slot.rows is not None:
        t = t[slot.rows[0] : slot.rows[1]]
    if slot.transposed:
        t = t.t()
    return t


class ShardedState:
    """A diffusers component's weights, one ``.safetensors`` file or several shards listed by a
    ``*.safetensors.index.json`` (a Flux transformer: 3 shards, its T5: 2), read lazily with the
    :class:`StateFile` interface. ``files``: key -> the shard that holds it."""

    def __init__(self, folder: Path, stem: str, mapped: bool = True):
        import json

        folder = Path(folder)
        index = folder / f"{stem}.safetensors.index.json"
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            shards = [single]
        elif index.is_file():
            try:
                wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                shards = [folder / n for n in sorted(set(wm.values()))]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise WeightsmithError(
                    f"{index} is damaged ({type(e).__name__}); copy the model folder again."
                ) from None
        else:
            raise WeightsmithError(
                f"{folder} holds no {stem}.safetensors (nor a sharded index); copy the model folder "
                "again (.bin weights are not read)."
            )
        self.path = folder
        self.metadata: dict = {}
        self.parts = [StateFile(p, mapped) for p in shards]
        self.files: dict[str, StateFile] = {}
        for part in self.parts:
            for k in part.keys():
                self.files[k] = part

    def keys(self):
        return list(self.files)

    def get(self, key: str) -> torch.Tensor:
        return self.files[key].get(key)

    def shape(self, key: str) -> tuple:
        return self.files[key].shape(key)
