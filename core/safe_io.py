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
import stat
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
    try:
        return _key(a).resolve() == _key(b).resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the spellings
        return _key(a) == _key(b)


def _inside(child, folder) -> bool:
    try:
        c, f = _key(child).resolve(), _key(folder).resolve()
    except (OSError, RuntimeError):
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
                raise WeightsmithError(
                    f"{lo} {o} is {li}; writing there would destroy it. Choose another path for {lo}."
                )
            if Path(p).is_dir() and _inside(o, p):
                raise WeightsmithError(
                    f"{lo} {o} lies inside {li} ({p}); writing there would change the input. Choose a path outside it."
                )
        for lo2, o2 in outs[i + 1 :]:
            if same_path(o, o2):
                raise WeightsmithError(
                    f"{lo} and {lo2} are the same path ({o}); the second write would "
                    "replace the first. Give them different paths."
                )


_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISBLK, "a block device"),
)


def special_kind(path) -> str | None:
    """What ``path`` is when it is an existing non-regular file (a device, FIFO, socket) or lies in
    ``/dev`` or ``/proc`` (``/dev/stdout``, ``/dev/fd/N``): such a path must never be renamed over
    (docs/reliability.md, "special output paths"). ``None`` for a regular file, a folder, or a new path."""
    p = _key(path)
    try:
        st = os.stat(p)
    except OSError:
        st = None
    if st is not None:
        for test, name in _KINDS:
            if test(st.st_mode):
                return name
        if stat.S_ISDIR(st.st_mode):
            return None
    if p.parts[1:2] in (("dev",), ("proc",)) and os.path.lexists(p):
        return f"a path in /{p.parts[1]}"
    return None


def _streamable(path) -> bool:
    """A report can be streamed (written straight, no temp file or rename) to a character device,
    a FIFO, or a regular file reached through /dev or /proc (``/dev/stdout`` redirected to a file)."""
    try:
        m = os.stat(_key(path)).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(m) or stat.S_ISFIFO(m) or stat.S_ISREG(m)


def check_writable_file(path, label: str = "the output", stream_ok: bool = False) -> Path:
    """Before any work: ``path`` can be created or replaced as a file (not a folder, folder exists
    and is writable). A device, FIFO, socket or /dev, /proc path is refused (it would be replaced by
    the atomic rename), except where ``stream_ok`` (a JSON report) and it can be written straight."""
    path = Path(path)
    kind = special_kind(path)
    if kind is not None:
        if stream_ok and _streamable(path):
            return path
        raise WeightsmithError(
            f"{label} {path} is {kind}, not a regular file; "
            + (
                "a report can be streamed only to a character device (/dev/stdout, /dev/null) or a FIFO. "
                if stream_ok
                else "a model or LoRA is written to a temp file and renamed into place, which would replace it. "
            )
            + "Give a path to a regular file."
        )
    if path.is_dir():
        raise WeightsmithError(
            f"{label} {path} is an existing folder; give a file name such as {path / 'out.safetensors'}."
        )
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise WeightsmithError(f"{label} {path}: {parent} is a file, not a folder.")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WeightsmithError(f"{label} {path}: the folder {probe} is not writable; choose a folder you can write to.")
    return path


def os_error_message(e: OSError, path=None, what: str = "write") -> str:
    name = path if path is not None else (e.filename or "")
    reason = e.strerror or type(e).__name__
    denied = (
        " (permission denied; choose another folder)"
        if what == "write"
        else " (permission denied: this user may not read it or a folder on its way; ask for access or copy it "
        "somewhere readable)"
    )
    hint = {
        28: " (the disk is full; free some space)",
        13: denied,
        30: " (read-only file system)",
        21: " (it is a folder)",
        36: " (file name too long)",
    }
    return f"could not {what} {name}: {reason}{hint.get(e.errno, '')}"


def atomic_write(path, write, suffix: str = ".tmp") -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temp file in the same folder (binary), which
    gets the umask mode and replaces ``path``; the temp file is removed on any error (also Ctrl-C).
    OS errors become one-line :class:`WeightsmithError`."""
    path = Path(path)
    kind = special_kind(path)
    if kind is not None:  # never renamed over (checked before any work by check_writable_file)
        raise WeightsmithError(
            f"{path} is {kind}, not a regular file; it cannot be replaced by a written file. "
            "Give a path to a regular file."
        )
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


def stream_write(path, raw: bytes) -> Path:
    """Write ``raw`` straight into an existing character device or FIFO (``/dev/stdout``,
    ``/dev/null``, a named pipe), never replacing it. A FIFO nobody reads is refused, not waited on."""
    path = Path(path)
    p = _key(path)
    try:
        mode = os.stat(p).st_mode
        fifo = stat.S_ISFIFO(mode)
        flags = os.O_WRONLY | (os.O_NONBLOCK if fifo else 0) | (os.O_TRUNC if stat.S_ISREG(mode) else 0)
        fd = os.open(p, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == 6:  # ENXIO: a FIFO with no reader
            raise WeightsmithError(
                f"{path} is a FIFO that no process is reading; start the reader first "
                "(e.g. cat) or give a regular file."
            ) from None
        raise WeightsmithError(os_error_message(e, path)) from None
    try:
        if fifo:
            os.set_blocking(fd, True)
        view = memoryview(raw)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError as e:
        raise WeightsmithError(os_error_message(e, path)) from None
    finally:
        os.close(fd)
    WRITTEN.append(path)
    return path


def write_json(path, data) -> Path:
    """A JSON file written atomically (see :func:`atomic_write`); NaN/Inf become ``null``. An existing
    character device or FIFO (``/dev/stdout``, a named pipe) gets the JSON streamed into it instead,
    and is never replaced; any other special path is refused."""
    raw = (json.dumps(json_safe(data), indent=2) + "\n").encode()
    if special_kind(path) is not None and _streamable(path):
        return stream_write(path, raw)
    return atomic_write(path, lambda f: f.write(raw), suffix=".json.tmp")


def write_report_after(report: dict, path, out) -> None:
    """Write a run's JSON report once its output ``out`` is written; a failure says that ``out`` is
    complete (one line, no traceback)."""
    try:
        write_json(path, report)
    except WeightsmithError as e:
        raise WeightsmithError(f"{out} was written and is complete, but the report was not: {e}") from None


def check_input(path, what: str, folder_ok: bool = False) -> Path:
    """Before ``path`` (an input: ``what`` names it, e.g. "--model" or "LoRA") is opened: it exists,
    is a regular file (or a folder where ``folder_ok``), and this user can read it. A FIFO, device or
    socket is refused without opening it (an ``open()`` of a FIFO would wait forever); a symlink loop,
    a broken link, a missing file and an unreadable one each get their own sentence
    (docs/reliability.md, "Inputs")."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == 40:  # ELOOP
            raise WeightsmithError(
                f"{what} {path} is a symlink loop (a link that leads back to itself); point it at the real file."
            ) from None
        if e.errno == 2 and os.path.lexists(path):
            raise WeightsmithError(
                f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not "
                "exist; fix the link or pass the real file."
            ) from None
        if e.errno == 2:
            raise WeightsmithError(f"{what} {path} does not exist; check the path.") from None
        if e.errno == 13:
            raise WeightsmithError(
                f"{what} {path} cannot be reached: permission denied on a folder on its way; "
                "ask for access or copy the file somewhere you can read."
            ) from None
        raise WeightsmithError(os_error_message(e, path, "read")) from None
    if stat.S_ISDIR(st.st_mode):
        if folder_ok:
            return path
        raise WeightsmithError(f"{what} {path} is a folder; pass the file itself.")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise WeightsmithError(
            f"{what} {path} is {kind}, not a regular file; Weightsmith reads only regular "
            "files (a pipe or device would be read forever or not at all). Pass the file itself."
        )
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise WeightsmithError(
            f"{what} {path} is not readable by this user (permission denied); make it "
            f"readable (e.g. chmod a+r {path}) or run as its owner."
        ) from None
    except OSError as e:
        raise WeightsmithError(os_error_message(e, path, "read")) from None
    return path


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
            ".safetensors."
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsmithError(f"{what} holds no state dict (a {type(sd).__name__}); it is not a weights file.")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ==============================================================================================
# The deterministic safetensors writer: every .safetensors file Weightsmith writes (checkpoints,
# LoRAs, the weights inside a diffusers folder) goes through write_safetensors; a file on its own
# through atomic_save_file (docs/reliability.md: same inputs -> same bytes, nothing non-finite).
_ST_DTYPE_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def nonfinite_keys(tensors: dict) -> list[str]:
    """Keys of floating tensors holding NaN or ±Inf."""
    import torch

    return [
        k
        for k in sorted(tensors)
        if isinstance(tensors[k], torch.Tensor)
        and tensors[k].is_floating_point()
        and not bool(torch.isfinite(tensors[k] if tensors[k].element_size() > 1 else tensors[k].float()).all())
    ]


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
            "Nothing was written."
        )


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


def atomic_save_streamed(meta: dict, get, path, metadata: dict | None = None) -> Path:
    """Write a .safetensors file whose tensors are read one at a time: ``meta`` maps each key to its
    ``(torch dtype, shape)``, ``get(key)`` returns the tensor when it is written, so a file larger than
    memory (a Flux transformer, 23.8 GB in bf16) is copied with one tensor resident. The same bytes as
    :func:`atomic_save_file` would write for the same tensors (sorted keys, sorted metadata); a tensor
    holding NaN/Inf, or of another dtype or shape than ``meta`` says, aborts the write (nothing is left)."""
    import json
    import struct

    import torch

    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for k in sorted(meta):
        dtype, shape = meta[k]
        name = _ST_DTYPE_NAMES.get(str(dtype).removeprefix("torch."))
        if name is None:
            raise WeightsmithError(f"cannot save tensor {k} of type {dtype}")
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[k] = {"dtype": name, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in sorted(meta):
            t = get(k).detach().cpu().contiguous()
            if t.dtype != meta[k][0] or tuple(t.shape) != tuple(meta[k][1]):
                raise WeightsmithError(f"internal: tensor {k} changed its type or shape while {path.name} was written.")
            if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
                raise WeightsmithError(
                    f"refusing to write {path.name}: tensor {k} holds NaN or infinite values. Nothing was written."
                )
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    return atomic_write(path, write, suffix=".safetensors.tmp")
