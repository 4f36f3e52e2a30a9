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
import re

import torch

from . import families
from .edit import Edit
from .errors import WeightsmithError, require
from .factor import svd_factor
from .safe_io import atomic_save_file

# the ss_base_model_version each family's LoRAs are written with (``Family.lora.base_model_version``)
BASE_MODEL_VERSION = {f.name: f.lora.base_model_version for f in families.all_families()}


def compress_factors(up: torch.Tensor, down: torch.Tensor, rank: int):
    """Best rank-``rank`` factors of ``up @ down`` (2-D, up: out × R, down: R × in) without forming
    the dense product: QR of both factors, SVD of the small R × R core. Returns (up, down, rel. error)."""
    Qu, Ru = torch.linalg.qr(up.double())
    Qd, Rd = torch.linalg.qr(down.double().t())
    U, S, Vh = torch.linalg.svd(Ru @ Rd.t())
    r = max(1, min(int(rank), S.numel()))
    err = float(S[r:].norm() / S.norm()) if S.norm() > 0 else 0.0
    return (Qu @ (U[:, :r] * S[:r])).float(), (Vh[:r] @ Qd.t()).float(), err


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
        delta = edit.deltas[name]
        if fmt == "diff":
            out[prefix + ".diff"] = delta.float().contiguous()
            errors[name] = 0.0
            continue
        fac = edit.factors.get(name)
        if fac is not None and (rank is None or fac[0].shape[1] <= rank):
            up, down = fac
            err = 0.0
        elif fac is not None and fac[0].shape[1] < min(delta.shape[0], delta[0].numel()):
            up, down, err = compress_factors(
                fac[0].reshape(fac[0].shape[0], -1), fac[1].reshape(fac[1].shape[0], -1), rank
            )
        else:
            up, down, err = svd_factor(delta, rank)
        if delta.dim() == 4 and up.dim() == 2:
            up = up.reshape(*up.shape, 1, 1)
            down = down.reshape(down.shape[0], *delta.shape[1:])
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
) -> dict:
    """Write ``edit`` as a kohya LoRA (atomic). Returns ``{"errors": {...}, "max_error": e, "rank": r}``.
    ``complete_fused``: add zero q/k/v/out siblings of edited text-encoder attention weights, which
    A1111 and diffusers need (see above). Refuses a ``path`` that is one of the edit's inputs
    (``edit.sources``) and an edit holding NaN/Inf."""
    from .safe_io import check_paths

    check_rank(rank)
    require(
        isinstance(dtype, torch.dtype) and dtype.is_floating_point,
        f"the LoRA's dtype must be a floating-point type (torch.float32, torch.float16 or torch.bfloat16), "
        f"got {dtype!r}.",
    )
    check_paths({"the LoRA output": path}, dict(getattr(edit, "sources", None) or {}))
    bad = [n for n in sorted(edit.deltas) if not bool(torch.isfinite(edit.deltas[n]).all())]
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
    largest); with a rank cap, the truncation error and how to lower it."""
    err = float(info.get("max_error") or 0.0)
    if err <= 1e-6:
        return "exact"
    if info.get("rank_cap") is None:
        return f"exact to float precision (largest relative error {err:.1e})"
    return f"largest relative export error {err:.2e} at rank {info['rank_cap']} (raise Rank to lower it)"
