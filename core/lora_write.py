"""Writing edits as LoRA files every host reads (kohya format, docs/method.md, "LoRA files").

- ``lora``: ``<prefix>.lora_down.weight`` (r × in [× kh × kw]), ``<prefix>.lora_up.weight``
  (out × r [× 1 × 1]) and ``<prefix>.alpha``. **One alpha for the whole file**: every module's
  ``.alpha`` is the file's largest rank R (= ``ss_network_dim`` = ``ss_network_alpha``) and a module
  of rank r has its up factor scaled by r/R, so ``alpha/r · up @ down`` is ΔW for every reader.
  (diffusers' kohya loader keeps one ``lora_alpha`` plus an ``alpha_pattern`` that misses modules,
  so per-module alphas = r loaded some modules at R'/r× their size; with one alpha only the
  ``rank_pattern`` is used, which it gets right.) Exact factors are written as they are; without
  factors, or when ``rank`` is smaller than the exact rank, ΔW is factorised by truncated SVD and
  the relative Frobenius error ‖ΔW − up·down‖/‖ΔW‖ is reported per module.
- ``diff``: full-rank ``<prefix>.diff`` tensors (ComfyUI, A1111 and Forge apply them as is;
  diffusers has no full-delta format, so use ``lora`` for diffusers).

With ``complete_fused=True`` (the default), missing q/k/v/out siblings of an edited text-encoder
attention weight are written as zero rank-1 entries: A1111 applies a LoRA to the fused attention of
SD2's encoder and SDXL's bigG only when all four are present (docs/method.md, "LoRA files"), and
diffusers recognises kohya text-encoder keys only when an ``out_proj`` entry is among them. Zero
entries change nothing.
"""

from __future__ import annotations

import json
import math
import re

import torch

from . import families
from .edit import Edit, delta_is_finite, delta_shape
from .errors import WeightsmithError, require
from .factor import svd_factor
from .layouts import flux_lora
from .safe_io import atomic_save_file

# the ss_base_model_version each family's LoRAs are written with (``Family.lora.base_model_version``)
BASE_MODEL_VERSION = {f.name: f.lora.base_model_version for f in families.all_families()}


def compress_factors(up: torch.Tensor, down: torch.Tensor, rank: int):
    """Best rank-``rank`` factors of ``up @ down`` (2-D, up: out × R, down: R × in) without forming
    the dense product: QR of both factors, SVD of the small R × R core. Returns (up, down, rel. error)."""
    from .factor import svd_of_product

    U, S, Vh = svd_of_product(up, down)
    r = max(1, min(int(rank), S.numel()))
    err = float(S[r:].norm() / S.norm()) if S.norm() > 0 else 0.0
    return (U[:, :r] * S[:r]).float(), Vh[:r].float(), err


_FUSED_ATTN = re.compile(r"^(.*\.self_attn)\.(q_proj|k_proj|v_proj|out_proj)$")


def _fused_siblings(edit: Edit) -> dict:
    """Zero rank-1 entries for the missing q/k/v/out siblings of every edited text-encoder attention
    weight. A1111 applies a LoRA to a fused ``nn.MultiheadAttention`` (SD2's encoder, SDXL's bigG)
    only when all four are present and skips the layer silently otherwise (docs/method.md, "LoRA
    files"); diffusers 0.42 infers the key type of kohya text-encoder LoRAs from an ``out_proj``
    (``to_out_lora``) entry and refuses a file with only k/v ("Could not automatically infer state dict type")."""
    extra = {}
    for name, d in edit.deltas.items():
        m = _FUSED_ATTN.match(name)
        if not m or not name.startswith(("text_encoder.", "text_encoder_2.")):
            continue
        for sub in ("q_proj", "k_proj", "v_proj", "out_proj"):
            other = f"{m.group(1)}.{sub}"
            if other not in edit.deltas and other not in extra:
                extra[other] = (torch.zeros(d.shape[0], 1), torch.zeros(1, d.shape[1]))
    return extra


def lora_tensors(edit: Edit, rank: int | None = None, fmt: str = "lora", complete_fused: bool = True):
    """kohya tensors for an edit, and per-module export errors."""
    if fmt not in ("lora", "diff"):
        raise WeightsmithError(f"unknown LoRA format {fmt!r}; use 'lora' or 'diff'.")
    if rank is not None and (isinstance(rank, bool) or int(rank) < 1):
        raise WeightsmithError(f"rank must be a positive integer (or None for exact), got {rank!r}.")
    lora = families.get(edit.family).lora  # the family's LoRA key layout
    layout = families.get(edit.family).denoiser_layout(edit.unet_config)
    out, errors = {}, {}
    for name, (up, down) in (_fused_siblings(edit) if complete_fused else {}).items():
        prefix = lora.write_prefix(name, layout)
        if fmt == "diff":
            out[prefix + ".diff"] = up @ down
        else:
            out[prefix + ".lora_up.weight"] = up
            out[prefix + ".lora_down.weight"] = down
    for name in sorted(edit.deltas):
        prefix = lora.write_prefix(name, layout)
        shape = delta_shape(edit, name)  # a lazily held ΔW is formed only where it is needed
        if fmt == "diff":
            out[prefix + ".diff"] = edit.deltas[name].float().contiguous()
            errors[name] = 0.0
            continue
        fac = edit.factors.get(name)
        if fac is not None and (rank is None or fac[0].shape[1] <= rank):
            up, down = fac
            err = 0.0
        elif fac is not None and fac[0].shape[1] < min(shape[0], math.prod(shape[1:])):
            up, down, err = compress_factors(
                fac[0].reshape(fac[0].shape[0], -1), fac[1].reshape(fac[1].shape[0], -1), rank
            )
        else:
            up, down, err = svd_factor(edit.deltas[name], rank)
        if len(shape) == 4 and up.dim() == 2:
            up = up.reshape(*up.shape, 1, 1)
            down = down.reshape(down.shape[0], *shape[1:])
        out[prefix + ".lora_up.weight"] = up.float().contiguous()
        out[prefix + ".lora_down.weight"] = down.float().contiguous()
        errors[name] = err
    if fmt == "lora":
        _one_alpha(out)
    return out, errors


def _one_alpha(tensors: dict) -> None:
    """Give every module the file's largest rank R as alpha, scaling each up factor by r/R (in
    float64, so ``alpha/r · up @ down`` stays ΔW to float32 rounding)."""
    ups = [k for k in tensors if k.endswith(".lora_up.weight")]
    if not ups:
        return
    R = max(int(tensors[k].shape[1]) for k in ups)
    for k in ups:
        r = int(tensors[k].shape[1])
        if r != R:
            tensors[k] = (tensors[k].double() * (r / R)).float().contiguous()
        tensors[k[: -len(".lora_up.weight")] + ".alpha"] = torch.tensor(float(R))


def check_rank(rank) -> None:
    """A LoRA rank cap is None (exact) or a whole number >= 1 (the CLI's ``--rank``)."""
    require(
        rank is None or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1),
        f"--rank must be a positive integer (a LoRA rank; leave it out for the exact rank), got {rank!r}.",
    )


def save_lora(
    edit: Edit,
    path,
    rank: int | None = None,
    fmt: str = "lora",
    metadata: dict | None = None,
    dtype=torch.float32,
    complete_fused: bool = True,
    t5_base=None,
    t5_prefix: str = "",
) -> dict:
    """Write ``edit`` as a kohya LoRA (atomic). Returns ``{"errors": {...}, "max_error": e, "rank": r}``.
    ``complete_fused``: add zero q/k/v/out siblings of edited text-encoder attention weights, which
    A1111 and diffusers need (see above). Refuses a ``path`` that is one of the edit's inputs
    (``edit.sources``) and an edit holding NaN/Inf. A Flux edit (``edit.family == "flux"``) is written
    by :func:`save_flux_lora` (``t5_base``/``t5_prefix``: the base T5 weights its T5 part is added to)."""
    from .safe_io import check_paths

    check_rank(rank)
    require(
        isinstance(dtype, torch.dtype) and dtype.is_floating_point,
        f"the LoRA's dtype must be a floating-point type (torch.float32, torch.float16 or torch.bfloat16), "
        f"got {dtype!r}.",
    )
    if edit.family == flux_lora.FAMILY:
        return save_flux_lora(edit, path, rank, fmt, metadata, dtype, t5_base=t5_base, t5_prefix=t5_prefix)
    check_paths({"the LoRA output": path}, dict(getattr(edit, "sources", None) or {}))
    bad = [n for n in sorted(edit.deltas) if not delta_is_finite(edit, n)]
    if bad:
        raise WeightsmithError(
            f"the edit's ΔW for {bad[0]} ({len(bad)} module(s) in all) holds NaN or infinite "
            "values; nothing was written."
        )
    tensors, errors = lora_tensors(edit, rank, fmt, complete_fused)
    if not tensors:
        raise WeightsmithError("the edit is empty; there is nothing to write.")
    ranks = [t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks) if ranks else "dynamic"),
        "ss_network_alpha": str(max(ranks) if ranks else "dynamic"),
        "ss_base_model_version": BASE_MODEL_VERSION.get(edit.family, edit.family),
        "ss_training_comment": "written by Weightsmith (closed-form edit, not trained)",
        "ws_format": fmt,
        "ws_family": edit.family,
        "ws_method": str(edit.report.get("method", "")),
    }
    if "targets" in edit.report:
        meta["ws_targets"] = json.dumps(edit.report.get("targets"))
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    atomic_save_file({k: (v.to(dtype) if v.dim() else v) for k, v in tensors.items()}, path, meta)
    return {
        "errors": errors,
        "max_error": max(errors.values()) if errors else 0.0,
        "rank": max(ranks) if ranks else None,
        "rank_cap": None if rank is None else int(rank),
    }


def export_note(info: dict) -> str:
    """How exactly a written LoRA holds the edit, for people (one wording for every host): ``exact``;
    at full rank, what only float precision dropped (singular values under ``WRITE_RTOL`` of the
    largest); with a rank cap, the truncation error and how to lower it; then the writer's note where
    it has one (a Flux edit's T5 part written as a full T5 file, docs/flux_lora.md)."""
    err = float(info.get("max_error") or 0.0)
    if err <= 1e-6:
        out = "exact"
    elif info.get("rank_cap") is None:
        out = f"exact to float precision (largest relative error {err:.1e})"
    else:
        out = f"largest relative export error {err:.2e} at rank {info['rank_cap']} (raise Rank to lower it)"
    return f"{out}. {info['note']}" if info.get("note") else out


# ----------------------------------------------------------------------------------------------
# Flux.1 (docs/flux_lora.md, "What Weightsmith writes")
def _module_factors(edit: Edit, name: str, rank: int | None):
    """(up, down, relative export error) of one module of ``edit``: its exact factors where it has
    them within ``rank``, else the best rank-``rank`` factors (exact rank when ``rank`` is None)."""
    shape = delta_shape(edit, name)
    fac = edit.factors.get(name)
    if fac is not None and (rank is None or fac[0].shape[1] <= rank):
        return fac[0].reshape(fac[0].shape[0], -1), fac[1].reshape(fac[1].shape[0], -1), 0.0
    if fac is not None and fac[0].shape[1] < min(shape[0], math.prod(shape[1:])):
        return compress_factors(fac[0].reshape(fac[0].shape[0], -1), fac[1].reshape(fac[1].shape[0], -1), rank)
    delta = edit.deltas[name]
    return svd_factor(delta.reshape(delta.shape[0], -1), rank)


def flux_lora_tensors(edit: Edit, rank: int | None = None):
    """PEFT tensors of a Flux edit's transformer and CLIP-L modules (scale 1 baked in, no alpha keys),
    the export error per module, and the canonical T5 modules left for the full T5 file."""
    factors, errors = {}, {}
    for name in sorted(edit.deltas):
        if name.startswith(flux_lora.T5 + "."):
            factors[name] = None
            continue
        up, down, err = _module_factors(edit, name, rank)
        factors[name], errors[name] = (up, down), err
    t5 = sorted(n for n, f in factors.items() if f is None)
    try:
        tensors, _ = flux_lora.write_tensors({n: f for n, f in factors.items() if f is not None})
    except KeyError as e:
        raise WeightsmithError(
            f"the Flux edit names {e.args[0]}, which is no linear layer of the Flux transformer; it was not "
            "computed on a Flux model."
        ) from None
    return tensors, errors, t5


def save_flux_lora(
    edit: Edit,
    path,
    rank: int | None = None,
    fmt: str = "lora",
    metadata: dict | None = None,
    dtype=torch.float32,
    *,
    t5_base=None,
    t5_prefix: str = "",
) -> dict:
    """Write a Flux edit as the LoRA layout ComfyUI, Forge and diffusers all load in full: diffusers/PEFT
    names, fused BFL layers split, ``transformer.<module>.lora_A/lora_B.weight`` with scale 1 (no alpha
    keys), CLIP-L as ``text_encoder.text_model.…`` (docs/flux_lora.md). T5 deltas are written into a
    full T5 encoder file ``<stem>_t5xxl.safetensors`` beside the LoRA (``t5_base``: the base T5 weights,
    a mapping or a state reader with ``keys()``/``get()``, HF ``T5EncoderModel`` keys after
    ``t5_prefix``), and the LoRA's metadata and the returned ``note`` say so. Atomic, deterministic."""
    from pathlib import Path

    from .safe_io import check_paths

    if fmt != "lora":
        raise WeightsmithError(
            f"Flux edits are written as low-rank LoRAs (format 'lora'), not {fmt!r}: diffusers loads no "
            "full-delta (.diff) file, and 'lora' at the exact rank holds the edit exactly."
        )
    path = Path(path)
    has_t5 = any(n.startswith(flux_lora.T5 + ".") for n in edit.deltas)
    t5_path = path.with_name(path.stem + "_t5xxl.safetensors") if has_t5 else None
    outs = {"the LoRA output": path}
    if t5_path is not None:
        outs["the T5 encoder output"] = t5_path
    check_paths(outs, dict(getattr(edit, "sources", None) or {}))
    bad = [n for n in sorted(edit.deltas) if not delta_is_finite(edit, n)]
    if bad:
        raise WeightsmithError(
            f"the edit's ΔW for {bad[0]} ({len(bad)} module(s) in all) holds NaN or infinite values; "
            "nothing was written."
        )
    tensors, errors, t5 = flux_lora_tensors(edit, rank)
    if has_t5 and t5_base is None:
        raise WeightsmithError(
            f"the edit changes the T5 encoder ({len(t5)} module(s), e.g. {t5[0]}), which diffusers cannot load "
            "as a LoRA, so that part is written as a full T5 encoder file beside the LoRA; this needs the base "
            "T5 weights the edit was computed on (save_lora(..., t5_base=...)). Nothing was written."
        )
    if not tensors and not t5:
        raise WeightsmithError("the edit is empty; there is nothing to write.")
    note = flux_lora.T5_NOTE.format(file=t5_path.name) if t5 else ""
    if t5 and not tensors:
        note += " The edit changes nothing else, so no LoRA file was written."
    ranks = [int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_A.weight")]
    meta = {
        "ss_base_model_version": flux_lora.BASE_MODEL_VERSION,
        "ss_training_comment": "written by Weightsmith (closed-form edit, not trained)",
        "ws_format": "peft",
        "ws_family": edit.family,
        "ws_method": str(edit.report.get("method", "")),
    }
    if note:
        meta["ws_note"] = note
        meta["ws_t5_file"] = t5_path.name
    if "targets" in edit.report:
        meta["ws_targets"] = json.dumps(edit.report.get("targets"))
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    if t5:
        save_t5_encoder(t5_base, {n: edit.deltas[n] for n in t5}, t5_path, prefix=t5_prefix)
        errors.update(dict.fromkeys(t5, 0.0))
    if tensors:
        atomic_save_file({k: v.to(dtype) for k, v in tensors.items()}, path, meta)
    return {
        "errors": errors,
        "max_error": max(errors.values()) if errors else 0.0,
        "rank": max(ranks) if ranks else None,
        "rank_cap": None if rank is None else int(rank),
        "t5_file": str(t5_path) if t5 else None,
        "lora_file": str(path) if tensors else None,
        "note": note,
    }


_ST_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_t5_encoder(base, deltas: dict, path, *, prefix: str = "", metadata: dict | None = None):
    """Write ``base`` (T5 encoder weights: a mapping or a reader with ``keys()``/``get(key)``) with
    ``deltas`` (canonical ``text_encoder_2.…`` -> ΔW) added, as a safetensors file, streamed: one
    tensor in memory at a time (each base tensor is read twice: once for the header, once to write).
    Atomic and deterministic (sorted keys); edited tensors keep the base dtype; nothing non-finite is
    written; ``base`` is not modified."""
    import struct

    from .safe_io import atomic_write

    keys = sorted(base.keys())
    have = set(keys)
    missing = sorted(k for c in deltas if (k := prefix + c[len(flux_lora.T5) + 1 :] + ".weight") not in have)
    if missing:
        raise WeightsmithError(
            f"the base T5 weights lack {missing[0]} ({len(missing)} edited weight(s) in all); pass the T5 "
            "encoder the edit was computed on."
        )
    header: dict = {"__metadata__": {k: str(v) for k, v in sorted({"format": "pt", **(metadata or {})}.items())}}
    offset = 0
    for k in keys:
        t = base.get(k)
        name = _ST_NAMES.get(t.dtype)
        if name is None:
            raise WeightsmithError(f"cannot write T5 tensor {k} of type {t.dtype}.")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": name, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k, t in flux_lora.t5_edited_state(base, deltas, prefix):
            t = t.detach().cpu().contiguous()
            if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
                raise WeightsmithError(f"the T5 weight {k} holds NaN or infinite values; nothing was written.")
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    return atomic_write(path, write, suffix=".safetensors.tmp")
