"""Safe writing: distinct paths, atomic writes with a normal file mode, one-line file-system errors.

Ground rules (docs/reliability.md): an input is never modified or replaced, every written path
differs from every input and from every other written path, a write is atomic (temp file in the
target folder + rename; no partial file and no temp file left behind on any error or Ctrl-C), and
the file gets the mode a plain ``open(path, "w")`` would give under the umask (``mkstemp`` alone
would leave 0600, unreadable for a ComfyUI or WebUI running as another user).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

from .errors import WeightsmithError

# paths this process has completed writing (the CLI's Ctrl-C message names them)
WRITTEN: list[Path] = []
_umask_lock = threading.Lock()


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process umask applied, as ``open()``/``mkdir()`` would create it."""
    with _umask_lock:
        u = os.umask(0o022)
        os.umask(u)
    return mode & ~u


def _key(p) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p))))


def same_path(a, b) -> bool:
    """Whether two paths name the same file (symlinks and hard links included)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return _key(a).resolve() == _key(b).resolve()


def _inside(child, folder) -> bool:
    try:
        c, f = _key(child).resolve(), _key(folder).resolve()
    except OSError:
        return False
    return f in c.parents


def check_paths(outputs: dict, inputs: dict) -> None:
    """Refuse (one clear line) any written path that is an input, lies inside an input folder, or
    repeats another written path. ``outputs``/``inputs``: label -> path (``None`` entries skipped);
    labels are what the user passed, e.g. ``"--report"`` or ``"the input LoRA a.safetensors"``."""
    outs = [(k, v) for k, v in outputs.items() if v is not None and str(v) != ""]
    ins = [(k, v) for k, v in inputs.items() if v is not None and str(v) != ""]
    for i, (lo, o) in enumerate(outs):
        for li, p in ins:
            if same_path(o, p):
                raise WeightsmithError(f"{lo} {o} is {li}; writing there would destroy it. Choose another "
                                       f"path for {lo}.")
            if Path(p).is_dir() and _inside(o, p):
                raise WeightsmithError(f"{lo} {o} lies inside {li} ({p}); writing there would change the "
                                       f"input. Choose a path outside it.")
        for lo2, o2 in outs[i + 1:]:
            if same_path(o, o2):
                raise WeightsmithError(f"{lo} and {lo2} are the same path ({o}); the second write would "
                                       "replace the first. Give them different paths.")


def check_writable_file(path, label: str = "the output") -> Path:
    """Before any work: ``path`` can be created or replaced as a file (not a folder, folder exists
    and is writable)."""
    path = Path(path)
    if path.is_dir():
        raise WeightsmithError(f"{label} {path} is an existing folder; give a file name such as "
                               f"{path / 'out.safetensors'}.")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise WeightsmithError(f"{label} {path}: {parent} is a file, not a folder.")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WeightsmithError(f"{label} {path}: the folder {probe} is not writable; choose a folder you can "
                               "write to.")
    return path


def os_error_message(e: OSError, path=None, what: str = "write") -> str:
    name = path if path is not None else (e.filename or "")
    reason = e.strerror or type(e).__name__
    hint = {28: " (the disk is full; free some space)", 13: " (permission denied; choose another folder)",
            30: " (read-only file system)", 21: " (it is a folder)", 36: " (file name too long)"}
    return f"could not {what} {name}: {reason}{hint.get(e.errno, '')}"


def atomic_write(path, write, suffix: str = ".tmp") -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temp file in the same folder (binary), which
    gets the umask mode and replaces ``path``; the temp file is removed on any error (also Ctrl-C).
    OS errors become one-line :class:`WeightsmithError`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".ws-", suffix=suffix, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise WeightsmithError(os_error_message(e, path)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
    WRITTEN.append(path)
    return path


def json_safe(x):
    """``x`` with non-finite floats as ``None`` and unknown objects as strings (valid JSON)."""
    import math

    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_json(path, data) -> Path:
    """A JSON file written atomically (see :func:`atomic_write`); NaN/Inf become ``null``."""
    raw = (json.dumps(json_safe(data), indent=2) + "\n").encode()
    return atomic_write(path, lambda f: f.write(raw), suffix=".json.tmp")


def write_report_after(report: dict, path, out) -> None:
    """Write a run's JSON report once its output ``out`` is written; a failure says that ``out`` is
    complete (one line, no traceback)."""
    try:
        write_json(path, report)
    except WeightsmithError as e:
        raise WeightsmithError(f"{out} was written and is complete, but the report was not: {e}") from None


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def load_plain_pickle(path, what: str) -> dict:
    """The tensors of a pickle file (``.ckpt``/``.pt``/``.pth``/``.bin``) read with
    ``torch.load(weights_only=True)``, which refuses anything but plain tensors and containers
    (pickles can run code). A ``state_dict`` wrapper is unwrapped; non-tensor entries are dropped.
    ``what`` names the file in the error (e.g. "LoRA x.pt")."""
    import torch

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsmithError(
            f"{what} could not be loaded safely with torch.load(weights_only=True) ({type(e).__name__}). "
            "Pickle files can run code, so Weightsmith only reads plain-tensor pickles: convert it to "
            ".safetensors.") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsmithError(f"{what} holds no state dict (a {type(sd).__name__}); it is not a weights file.")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ==============================================================================================
# The deterministic safetensors writer: every .safetensors file Weightsmith writes (checkpoints,
# LoRAs, the weights inside a diffusers folder) goes through write_safetensors; a file on its own
# through atomic_save_file (docs/reliability.md: same inputs -> same bytes, nothing non-finite).
_ST_DTYPE_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                   "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def nonfinite_keys(tensors: dict) -> list[str]:
    """Keys of floating tensors holding NaN or ±Inf."""
    import torch

    return [k for k in sorted(tensors) if isinstance(tensors[k], torch.Tensor) and tensors[k].is_floating_point()
            and not bool(torch.isfinite(tensors[k]).all())]


def safetensors_header(tensors: dict, metadata: dict) -> tuple[bytes, list]:
    """A safetensors header with keys in sorted order, and the tensors in that order (the library's
    own writer orders metadata by hash, so identical inputs would not give identical bytes)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    offset, order = 0, []
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        name = _ST_DTYPE_NAMES.get(str(t.dtype).removeprefix("torch."))
        if name is None:
            raise WeightsmithError(f"cannot save tensor {k} of type {t.dtype}")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": name, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        order.append(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, order


def refuse_nonfinite(tensors: dict, path) -> None:
    """Refuse (naming a tensor) to write ``path`` when any tensor holds NaN or ±Inf."""
    bad = nonfinite_keys(tensors)
    if bad:
        raise WeightsmithError(
            f"refusing to write {Path(path).name}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0]}). "
            "Nothing was written.")


def write_safetensors(f, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (and string ``metadata``) as safetensors bytes to the binary file ``f``,
    deterministically (sorted keys, no timestamps). The caller makes the write atomic."""
    import struct

    import torch

    header, order = safetensors_header(tensors, metadata or {})
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for t in order:
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def atomic_save_file(tensors: dict, path, metadata: dict | None = None) -> Path:
    """Write a .safetensors file atomically (temp file + rename, mode as under the umask) and
    deterministically (:func:`write_safetensors`). Refuses to write NaN/Inf (naming the tensor):
    nothing non-finite is ever written."""
    path = Path(path)
    refuse_nonfinite(tensors, path)
    return atomic_write(path, lambda f: write_safetensors(f, tensors, metadata), suffix=".safetensors.tmp")
