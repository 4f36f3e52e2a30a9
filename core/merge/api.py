"""``merge()``: one entry point for IterIS and the baselines, and writing the result."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .. import families
from ..edit import Edit, delta_is_finite
from ..errors import WeightsmithError
from ..memory import gib
from ..progress import Steps
from . import baselines
from .iteris import IterISSolver
from .options import DATA_FREE, METHODS, MergeOptions
from .sampling import default_prompts, make_samples


def _as_loras(model, loras):
    from ..lora_read import LoRA, load_lora

    out = []
    for item in loras:
        if isinstance(item, LoRA):
            out.append(item.bind(model))
        elif isinstance(item, (str, Path)):
            out.append(load_lora(item, model))
        else:
            raise WeightsmithError(f"cannot merge a {type(item).__name__}; pass LoRA files or load_lora() results.")
    return out


def _with_blocks(model, loras, blocks, presets):
    """The LoRAs with their block weights applied (core/blockweights.py), and each one's report row."""
    from .. import blockweights

    if blocks is None:
        return loras, [None] * len(loras)
    if isinstance(blocks, str) or len(blocks) != len(loras):
        raise WeightsmithError(f"give one block-weight string per LoRA ({len(loras)}), or none; got {blocks!r}.")
    out, rows = [], []
    for l, b in zip(loras, blocks):
        try:
            l2, row = blockweights.apply(l, b, model, presets)
        except WeightsmithError as e:
            raise WeightsmithError(f"LoRA {l.name}: {e}") from None
        out.append(l2)
        rows.append(row)
    return out, rows


def _prompts_for(loras, prompts, count):
    """Per-LoRA prompt lists and where they came from."""
    k = len(loras)
    if prompts is None:
        per = [None] * k
    elif isinstance(prompts, dict):
        per = [prompts.get(l.name) or prompts.get(str(l.path)) or prompts.get(i) for i, l in enumerate(loras)]
    elif all(isinstance(p, str) for p in prompts):
        per = [list(prompts)] * k
    else:
        per = [list(p) if p else None for p in prompts]
        if len(per) != k:
            raise WeightsmithError(f"got prompt lists for {len(per)} LoRAs but {k} LoRAs to merge.")
    out, sources = [], []
    for l, p in zip(loras, per):
        p = [s.strip() for s in (p or []) if s and s.strip()]
        if p:
            out.append(p)
            sources.append("user")
        else:
            d, src = default_prompts(l, count=max(1, min(4, count)))
            out.append(d)
            sources.append(src)
    return out, sources


def _check_model_finite(model) -> None:
    """The weights IterIS/RegMean sample (text encoders, UNet) hold no NaN/Inf; else one
    :class:`WeightsmithError` naming the first such tensor (docs/reliability.md, "Non-finite values").
    A model that reads its weights as it samples (Flux) checks them itself."""
    if hasattr(model, "check_finite"):
        model.check_finite()
        return
    parts = [(f"text-encoder weight {c}.", te) for c, te in model.text_encoders.items()]
    parts.append(("UNet weight unet.", model.unet))
    for what, module in parts:
        for n, prm in module.named_parameters():
            if prm.is_floating_point() and not bool(torch.isfinite(prm).all()):
                raise WeightsmithError(
                    f"the model's {what}{n} holds NaN or infinite values; the model file is damaged, so IterIS "
                    "cannot sample it. Use an intact copy of the model."
                )


def require_mergeable(model, method: str | None = None) -> None:
    """Refuse a merge Weightsmith cannot do on ``model``: the SD families take every method; on Flux.1 see
    :func:`require_flux_method`, and the data-driven methods need both text encoders."""
    if getattr(model, "unet_config", None) or not hasattr(model, "parts"):
        return
    require_flux_method(method)
    if (method or "iteris").lower() not in DATA_FREE:
        model.require_text_encoders(f"{method or 'iteris'} on {families.label('flux')}")


def require_flux_method(method: str | None) -> None:
    """Every method runs on Flux.1; IterIS and RegMean run its transformer with diffusers'
    ``FluxTransformer2DModel`` (docs/flux_lora.md, "IterIS on Flux"), which an old diffusers lacks. Needs
    no model: the CLI asks before reading one."""
    if method is not None and method.lower() in DATA_FREE:
        return
    from ..flux_sampling import require_diffusers

    require_diffusers()


def check_flux_parts(model, changes: dict, fmt: str = "lora") -> None:
    """The text encoders a Flux merge's output needs are loaded: a checkpoint adds every changed
    component to its base weights; a LoRA file carries CLIP-L itself but a T5 change goes into a T5 file
    made from the base T5 (docs/flux_lora.md). ``changes``: what is named in the message (``"LoRA x"``,
    ``"the merge"``) -> the canonical modules it changes. Raises a WeightsmithError naming it and the fix."""
    from ..layouts.flux_names import CLIP_L, T5

    held = set(getattr(model, "parts", {}))
    need = (CLIP_L, T5) if fmt == "checkpoint" else (T5,)
    label = {CLIP_L: "CLIP-L", T5: "T5-XXL"}
    for who, modules in changes.items():
        comps = {n.partition(".")[0] for n in modules}
        missing = [c for c in need if c in comps and c not in held]
        if missing:
            what = " and ".join(label[c] for c in missing)
            raise WeightsmithError(
                f"{who} changes the {what} text encoder, and writing the merged "
                f"{'checkpoint' if fmt == 'checkpoint' else 'T5 file'} needs its base weights, which were not "
                f"loaded: pass the text-encoder file{'s' if len(missing) > 1 else ''} the model uses with "
                "--text-encoder (e.g. --text-encoder t5xxl_fp16.safetensors), as ComfyUI's DualCLIPLoader takes them."
            )


def merge(
    model,
    loras,
    method: str = "iteris",
    weights=None,
    prompts=None,
    options: MergeOptions | None = None,
    progress=None,
    cancel=None,
    blocks=None,
    block_presets: dict | None = None,
) -> Edit:
    """Merge LoRAs into one edit of ``model`` (an :class:`~weightsmith.core.sdmodel.SDModel`).

    ``loras``: :class:`~weightsmith.core.lora_read.LoRA` objects (from ``load_lora(path, model)``) or
    paths. ``method``: ``iteris`` | ``linear`` | ``concat`` | ``svd`` | ``ties`` | ``dare`` | ``regmean``.
    ``weights``: one float per LoRA (default 1); for ``iteris``/``regmean`` they are relative
    importances ``m_i`` (docs/method.md, "LoRA merging") and, under IterIS's default ``ridge_toward
    "sum"``, the weights of the sum its ridge pulls toward; for the data-free methods they scale the deltas.
    ``prompts``: ``None`` (from each LoRA's ``ss_tag_frequency``), one list for all LoRAs, a list of
    lists (one per LoRA) or a dict ``{lora name: [...]}``. ``progress(done, total, label)`` and
    ``cancel() -> bool`` as everywhere in Weightsmith. ``blocks``: one block-weight string per LoRA
    (LoRA Block Weight's presets or vectors, docs/merge.md "Block weights"; None or "" = none), applied
    to each LoRA's modules before any method runs, so every method (IterIS included) sees each LoRA as
    it runs with those block weights; ``block_presets``: extra presets (``blockweights.parse_presets``).

    Returns an :class:`~weightsmith.core.edit.Edit` whose ``factors`` hold exact low-rank factors
    where the method has them (iteris, regmean, concat, svd), and whose ``report`` holds
    ``method``, ``loras``, ``time_s``, ``iterations``, ``curve`` (per-iteration ``objective`` and
    ``change``) and ``residuals`` (per module ``sqrt(J_m / Σ λ m ‖XΔW_iᵀ‖²)``). The model is not changed.
    """
    t0 = time.time()
    require_mergeable(model, method or "iteris")
    opts = options or MergeOptions()
    opts.validate()
    method = (method or "iteris").lower()
    if method not in METHODS:
        raise WeightsmithError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}.")
    if not loras:
        raise WeightsmithError("no LoRAs to merge; pass at least one (--lora FILE).")
    loras = _as_loras(model, loras)
    k = len(loras)
    try:
        weights = [1.0] * k if weights is None else [float(w) for w in weights]
    except (TypeError, ValueError):
        raise WeightsmithError(f"weights must be numbers, one per LoRA; got {weights!r}.") from None
    if len(weights) != k:
        raise WeightsmithError(f"got {len(weights)} weights for {k} LoRAs; give one weight per LoRA.")
    bad = [(l.name, w) for l, w in zip(loras, weights) if not math.isfinite(w)]
    if bad:
        raise WeightsmithError(f"the weight of LoRA {bad[0][0]} is {bad[0][1]}; weights must be finite numbers.")
    if opts.untouched not in ("skip", "zero"):
        raise WeightsmithError(f"unknown untouched-module rule {opts.untouched!r}; use 'skip' or 'zero'.")
    if method in ("iteris", "regmean") and any(w <= 0 for w in weights):
        raise WeightsmithError("IterIS/RegMean weights are relative importances and must be positive.")
    loras, block_rows = _with_blocks(model, loras, blocks, block_presets)
    info = [dict(l.summary(), weight=w) for l, w in zip(loras, weights)]
    for d, b in zip(info, block_rows):
        if b is not None:
            d["blocks"] = b
    if method in ("iteris", "regmean"):
        # the model that samples: the model itself, or what a family that streams its weights builds for it
        sampler_model = (
            model.sampling_model(set().union(*[set(l.modules) for l in loras]))
            if hasattr(model, "sampling_model")
            else model
        )
        _check_model_finite(sampler_model)  # before sampling: NaN would surface as a torch.linalg assert
        plist, sources = _prompts_for(loras, prompts, opts.samples)
        samples = [make_samples(p, opts.samples, opts.seed) for p in plist]
        for d, p, s in zip(info, plist, sources):
            d.update(prompts=p, prompts_source=s)
        solver = IterISSolver(sampler_model, loras, weights, samples, opts, regmean=(method == "regmean"))
        blocks = solver.cost_blocks()  # one per text batch / UNet step: the time left shows after the first
        n_pass = solver.planned_passes()
        steps = Steps(sum(len(b) * r for b, r in blocks), progress, cancel, cost_blocks=blocks)
        plan = solver.memory
        groups = (
            f" in {plan['chunks']} layer groups (memory budget {gib(plan['budget_bytes'])})"
            if plan["chunks"] > 1
            else ""
        )
        if plan.get("budget_rule"):
            groups += f"; {plan['budget_rule']}"
        px = solver.latent * 8
        rows = f", at most {opts.max_rows} positions per layer" if opts.max_rows else ""
        steps.start(
            f"{method}: {n_pass} passes ({k} LoRAs{groups}), each {opts.samples} samples × "
            f"{opts.steps} steps at {px} px{rows}; the time left shows after the first step"
        )
        solver.steps_counter, solver.check = steps, steps.check
        edit = solver.run()
        edit.report["options"] = {
            k: v
            for k, v in opts.to_dict().items()
            if k not in ("svd_rank", "svd_clamp_quantile", "ties_density", "ties_lambda", "dare_p")
        }
    else:
        steps = Steps(1, progress, cancel)
        steps.check()
        if method == "linear":
            edit = baselines.linear(model, loras, weights)
        elif method == "concat":
            edit = baselines.concat(model, loras, weights)
        elif method == "svd":
            edit = baselines.svd_merge(model, loras, weights, opts.svd_rank, opts.svd_clamp_quantile)
        elif method == "ties":
            edit = baselines.ties(model, loras, weights, opts.ties_density, opts.ties_lambda)
        else:
            edit = baselines.dare(model, loras, weights, opts.dare_p, opts.seed)
        steps.step(method)
        edit.report.setdefault("iterations", 0)
        edit.report.setdefault("curve", [])
        edit.report.setdefault("residuals", {})
    bad = [n for n in sorted(edit.deltas) if not delta_is_finite(edit, n)]  # svd: computes each module once
    if bad:
        raise WeightsmithError(
            f"the merge gave NaN or infinite values for {bad[0]} ({len(bad)} module(s)); the "
            "base model or a LoRA is out of range there. Check the inputs, or raise --alpha."
        )
    edit.report.update(method=method, family=model.family, loras=info, options=opts.to_dict(), time_s=time.time() - t0)
    edit.sources = _sources(model, loras)
    return edit


def _sources(model, loras) -> dict:
    """label -> path of the merge's input files (outputs must differ from all of them)."""
    out = {}
    src = getattr(getattr(model, "source", None), "path", None)
    if src is not None:
        out["the input model"] = src
    for l in loras:
        if getattr(l, "path", None):
            out[f"the input LoRA {l.path}"] = l.path
    return out


def merged_tag_frequency(loras) -> dict:
    """The inputs' ``ss_tag_frequency`` side by side (so a merged LoRA still has default prompts)."""
    out = {}
    for l in loras:
        raw = l.metadata.get("ss_tag_frequency")
        if not raw:
            continue
        try:
            for ds, tags in json.loads(raw).items():
                out[f"{l.name}/{ds}"] = tags
        except Exception:
            continue
    return out


def save_merge(edit: Edit, model, out, fmt: str = "lora", rank: int | None = None, loras=()) -> dict:
    """Write a merge: ``fmt="lora"`` (kohya LoRA; exact factors, or SVD to ``rank`` with the error
    reported), ``"diff"`` (full deltas) or ``"checkpoint"`` (base + ΔW in the model's own format).
    Returns ``{"path", "format", "rank", "max_error", ...}``; nothing is written on error."""
    from ..lora_write import save_lora
    from ..model_io import check_output_path, save_edited_model

    out = Path(out)
    named = dict(edit.sources)
    named.update(_sources(model, loras))
    check_output_path(out, list(named.items()), "the merge output")
    flux = getattr(model, "parts", None) is not None  # a FluxModel: the Flux writers (docs/flux_lora.md)
    if flux:
        from ..flux_io import require_flux_format

        require_flux_format(fmt, "merged")
        check_flux_parts(model, {"the merge": edit.deltas}, fmt)
    meta_in = {"ws_method": edit.report.get("method", ""), "ws_inputs": json.dumps([l.name for l in loras])}
    if flux and fmt == "checkpoint":
        from ..flux_io import save_flux_edit

        info = save_flux_edit(model, edit.deltas, out, meta_in)
        return {"path": str(out), "format": "checkpoint", **info}
    if fmt == "checkpoint":
        save_edited_model(model, edit.deltas, out, metadata=meta_in)
        return {"path": str(out), "format": "checkpoint"}
    if fmt not in ("lora", "diff"):
        raise WeightsmithError(f"unknown output format {fmt!r}; use lora or checkpoint.")
    if out.suffix.lower() != ".safetensors":
        raise WeightsmithError(f"LoRA output must end in .safetensors, not {out.suffix or 'nothing'!r}.")
    rep = edit.report
    meta = {
        "ws_method": rep.get("method", ""),
        "ws_inputs": json.dumps(
            [{"name": d.get("name"), "weight": d.get("weight"), "ranks": d.get("ranks")} for d in rep.get("loras", [])]
        ),
        "ws_settings": json.dumps({k: v for k, v in (rep.get("options") or {}).items()}),
        "ss_output_name": out.stem,
    }
    from ..blockweights import file_metadata

    meta.update(file_metadata(rep))
    tf = merged_tag_frequency(loras)
    if tf:
        meta["ss_tag_frequency"] = json.dumps(tf)
    t5 = {}
    if flux and any(n.startswith("text_encoder_2.") for n in edit.deltas):
        from ..flux_io import t5_base

        t5 = {"t5_base": t5_base(model)}  # the T5 part is written as a T5 file beside the LoRA
    res = save_lora(edit, out, rank=rank, fmt=fmt, metadata=meta, complete_fused=True, **t5)
    got = {"path": str(out), "format": fmt, "rank": res["rank"], "max_error": res["max_error"], "errors": res["errors"]}
    if res.get("t5_file"):
        got.update(t5_file=res["t5_file"], note=res.get("note", ""))
    return got
