"""Reading and writing Stable Diffusion models: diffusers folders and single-file checkpoints.

- A **diffusers folder** (``model_index.json`` + ``unet/``, ``text_encoder/``, ``tokenizer/`` …)
  loads with diffusers/transformers ``from_pretrained(local_files_only=True)``.
- A **single-file checkpoint** (``.safetensors``; pickle ``.ckpt``/``.pt`` only through
  ``torch.load(weights_only=True)``) in the original LDM/CompVis key layout, as ComfyUI, A1111
  and Forge use. The family is recognised from the key layout, the text encoders' configs and the
  UNet's config are inferred from tensor shapes (:mod:`.layouts`; no hub look-ups, any width), the
  tensors are read lazily (:mod:`.state_files`), and names are mapped with
  :mod:`weightsmith.core.naming`. The UNet is only built when a solver needs to run it; erasure
  reads the few weights it edits straight from the file.

Edited models are written in the format they came in, atomically (temp file + rename, a diffusers
folder as a whole) and deterministically, every weights file through the one safetensors writer
(:func:`.safe_io.write_safetensors`); the input is never modified.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import families
from .errors import WeightsmithError, require
from .layouts import detect_checkpoint_family
from .layouts.ldm import heads_problem, infer_unet_config, metadata_json, te_config_from_keys
from .memory import WEIGHT_PRECISIONS
from .naming import (
    LDM_UNET_PREFIX,
    TE1,
    TE2,
    UNET,
    CheckpointSlot,
    UNetLayout,
    checkpoint_slot,
    open_clip_slot,
    te_checkpoint_prefix,
    te_path,
)
from .safe_io import atomic_save_file, check_input, nonfinite_keys, write_safetensors
from .sdmodel import SDModel, default_encoder_specs, detect_family
from .state_files import DictState, StateFile, read_slot
from .tokenizer import find_clip_tokenizer, load_tokenizer_folder

# the names this module had before the writer, the readers and the layouts moved out (scripts and
# tests import them from here)
__all__ = [
    "ModelSource",
    "WEIGHT_DTYPES",
    "add_deltas_to_ldm_state",
    "atomic_save_file",
    "beside_host_weights_dtype",
    "check_output_path",
    "detect_checkpoint_family",
    "encoder_tokenizer",
    "fast_init",
    "infer_unet_config",
    "load_model",
    "model_from_state_dict",
    "nonfinite_keys",
    "save_edited_model",
    "save_single_file",
    "stored_half_dtype",
    "te_params",
    "to_ldm_state_dict",
]


@dataclass
class ModelSource:
    format: str  # "diffusers" | "single_file" | "memory"
    path: Path | None = None
    metadata: dict = field(default_factory=dict)
    te_heads: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# helpers
def fast_init():
    """Skip random initialisation while building modules whose every weight is loaded next
    (transformers' ``no_init_weights`` no-ops torch's init functions: SDXL's bigG encoder builds in
    0.03 s instead of 15 s on a CPU, the SD1.5 UNet in 0.06 s instead of 8 s)."""
    import contextlib

    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def te_params(te: torch.nn.Module):
    """(canonical parameter path inside the encoder, tensor): always with ``text_model.``."""
    for k, v in te.state_dict().items():
        yield te_path(k), v


def check_output_path(out: Path, inputs: list, label: str = "the output path") -> Path:
    """``out`` is none of ``inputs`` (paths, or (label, path) pairs) and not inside an input folder."""
    from .safe_io import check_paths

    out = Path(out)
    require(out.name != "", "the output path is empty; pass --out FILE.safetensors")
    named = {}
    for item in inputs:
        if isinstance(item, tuple):
            named[item[0]] = item[1]
        elif item is not None:
            named[f"the input {item}"] = item
    check_paths({label: out}, named)
    return out


# ----------------------------------------------------------------------------------------------
# loading
WEIGHT_DTYPES = {name: (None if name == "float32" else getattr(torch, name)) for name in WEIGHT_PRECISIONS}


def load_model(
    path, *, clip_skip: int | None = None, tokenizer=None, weights_dtype=None, text_encoders=(), t5_length=None
):
    """Load an SD1.x / SD2.x / SDXL model from a diffusers folder or a single-file checkpoint, or a Flux.1
    model (a BFL transformer file, a ComfyUI all-in-one checkpoint or a diffusers folder, recognised
    from its keys) as a :class:`~weightsmith.core.fluxmodel.FluxModel` (docs/flux.md, "Files Weightsmith
    reads"); ``text_encoders``: Flux's separate CLIP-L / T5 files (``--text-encoder``), ``t5_length``: T5
    tokens (default 256).

    ``tokenizer``: a CLIPTokenizer or folder, needed for single-file checkpoints when no CLIP
    vocabulary can be found offline (see :func:`weightsmith.core.tokenizer.find_clip_tokenizer`).
    ``weights_dtype``: ``torch.bfloat16`` / ``torch.float16`` (or their names) hold the UNet's
    Linear/Conv weights at that precision, computed in float32 (:func:`..precision.hold_weights`;
    half the memory: SDXL's UNet 5.1 instead of 10.3 GB); default float32. The UNet is filled one
    tensor at a time, so loading never holds a second copy of it.
    """
    if isinstance(weights_dtype, str):
        require(
            weights_dtype in WEIGHT_DTYPES,
            f"unknown weights precision {weights_dtype!r}; use one of {', '.join(WEIGHT_DTYPES)}.",
        )
        weights_dtype = WEIGHT_DTYPES[weights_dtype]
    require(
        weights_dtype is None or (isinstance(weights_dtype, torch.dtype) and weights_dtype.is_floating_point),
        f"weights precision {weights_dtype!r} is not a floating-point type; use one of {', '.join(WEIGHT_DTYPES)}.",
    )
    path = Path(path)
    if not os.path.lexists(path):
        raise WeightsmithError(f"model not found: {path}. Pass a .safetensors checkpoint or a diffusers folder.")
    check_input(path, "the model", folder_ok=True)
    from .flux_io import is_flux

    if is_flux(path):
        return _load_flux(path, clip_skip, tokenizer, weights_dtype, text_encoders, t5_length)
    require(
        not text_encoders,
        f"--text-encoder files are for Flux models, but {path.name} is not one; an SD checkpoint holds its own "
        "text encoders: leave --text-encoder out.",
    )
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise WeightsmithError(
                f"{path} is a folder but not a diffusers model (no model_index.json). Pass a diffusers "
                "folder or a single-file .safetensors checkpoint."
            )
        return _load_diffusers(path, clip_skip, weights_dtype)
    return _load_single_file(path, clip_skip, tokenizer, weights_dtype)


def _load_flux(path: Path, clip_skip, tokenizer, weights_dtype, text_encoders, t5_length):
    """A Flux model for :func:`load_model` (docs/flux.md, "How Weightsmith holds a Flux model")."""
    from .flux_io import load_flux
    from .tokenizer import T5_LENGTH

    require(clip_skip is None, "--clip-skip applies to SD1.x/SD2.x; Flux reads CLIP-L's pooled output.")
    require(
        weights_dtype is None,
        "--weights-precision applies to the SD UNet; a Flux transformer stays in its file and is read in "
        "float32 one tensor at a time (docs/flux.md). Leave it out.",
    )
    return load_flux(path, tuple(text_encoders or ()), t5_length=t5_length or T5_LENGTH, tokenizer=tokenizer)


def stored_half_dtype(path) -> torch.dtype | None:
    """``torch.float16`` / ``torch.bfloat16`` when the single-file ``.safetensors`` checkpoint at
    ``path`` stores every UNet weight matrix and kernel in that one precision, else None (float32,
    mixed, another format). Holding the UNet in it (``load_model(weights_dtype=…)``) loses nothing:
    the layers compute in float32 from exactly the file's values."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    names = {"F16": torch.float16, "BF16": torch.bfloat16}
    try:
        with safe_open(str(path), framework="pt") as f:
            seen = {
                f.get_slice(k).get_dtype()
                for k in f.keys()
                if k.startswith(LDM_UNET_PREFIX) and len(f.get_slice(k).get_shape()) >= 2
            }
    except Exception:
        return None
    return names.get(seen.pop()) if len(seen) == 1 else None


def beside_host_weights_dtype(path) -> torch.dtype | None:
    """The precision to hold the UNet of checkpoint ``path`` in when Weightsmith computes beside a
    host that holds its own copy of the model (Forge; docs/a1111.md, "Memory"): the file's own half
    precision for SDXL (5.1 instead of 10.3 GB, the same results bit for bit, see
    :func:`stored_half_dtype`), float32 (None) otherwise: SD1/SD2 fit in float32 and compute
    without the per-layer cast."""
    half = stored_half_dtype(path)
    if half is None:
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        family = families.get(detect_checkpoint_family(list(f.keys())))
    return half if family.half_beside_host else None


def _folder_json(p: Path, what: str) -> dict:
    """A diffusers folder's JSON file as an object, or one :class:`WeightsmithError` naming it."""
    try:
        val = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsmithError(f"{what} is missing ({p}); copy the model folder again.") from None
    except PermissionError:
        raise WeightsmithError(f"{what} ({p}) is not readable by this user (permission denied).") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsmithError(
            f"{what} is not valid JSON ({e}); the folder is damaged: copy the model folder again."
        ) from None
    if not isinstance(val, dict):
        raise WeightsmithError(
            f"{what} is a JSON {type(val).__name__}, not an object; the folder is damaged: copy the model folder again."
        )
    return val


def _load_diffusers(path: Path, clip_skip, weights_dtype=None) -> SDModel:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index = _folder_json(path / "model_index.json", "the diffusers model's model_index.json")
    comps = [c for c in (TE1, TE2) if c in index and index[c] and index[c][0] is not None]
    require(bool(comps), f"{path} has no text encoder; Weightsmith edits text-conditioned SD models.")
    tes, toks = {}, {}
    try:
        for c in comps:
            cfg = json.loads((path / c / "config.json").read_text())
            cls = CLIPTextModelWithProjection if "WithProjection" in str(cfg.get("architectures")) else CLIPTextModel
            tes[c] = cls.from_pretrained(str(path / c), local_files_only=True, torch_dtype=torch.float32).eval()
            tes[c].requires_grad_(False)
            tdir = path / ("tokenizer" if c == TE1 else "tokenizer_2")
            toks[c] = load_tokenizer_folder(tdir, "the model's tokenizer folder")
        unet_cfg = json.loads((path / "unet" / "config.json").read_text())
    except WeightsmithError:
        raise
    except Exception as e:
        raise WeightsmithError(f"could not read the diffusers model at {path}: {type(e).__name__}: {e}") from None
    family = detect_family([t.config for t in tes.values()], unet_cfg)
    specs = default_encoder_specs(
        family, {c: t.config.num_hidden_layers for c, t in tes.items()}, from_diffusers=True, clip_skip=clip_skip
    )

    def load_unet():
        if not any(
            (path / "unet" / f).is_file()
            for f in (
                "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.fp16.safetensors",
            )
        ):
            raise WeightsmithError(
                f"the diffusers model {path} has no UNet weights (unet/"
                "diffusion_pytorch_model.safetensors is missing); copy the model folder again."
            )
        try:
            u = UNet2DConditionModel.from_pretrained(
                str(path / "unet"), local_files_only=True, torch_dtype=weights_dtype or torch.float32
            ).eval()
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise WeightsmithError(
                f"could not read the UNet of the diffusers model {path} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); copy the model folder "
                "again."
            ) from None
        u.requires_grad_(False)
        return _held(u, weights_dtype)

    scheduler = None
    if (path / "scheduler" / "scheduler_config.json").exists():
        import diffusers

        scfg = _folder_json(
            path / "scheduler" / "scheduler_config.json", "the diffusers model's scheduler/scheduler_config.json"
        )
        name = scfg.get("_class_name", "DDIMScheduler")
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        if cls is None or not hasattr(cls, "from_config"):
            raise WeightsmithError(
                f"the diffusers model's scheduler/scheduler_config.json names the scheduler "
                f"{name!r}, which diffusers does not have; fix _class_name (e.g. "
                '"DDIMScheduler") or copy the model folder again.'
            )
        try:
            scheduler = cls.from_config(scfg)
        except Exception as e:
            raise WeightsmithError(
                f"the diffusers model's scheduler/scheduler_config.json is not a valid {name} "
                f"configuration ({type(e).__name__}); copy the model folder again."
            ) from None
    return SDModel(
        family=family,
        text_encoders=tes,
        tokenizers=toks,
        encoder_specs=specs,
        unet_config=unet_cfg,
        unet_loader=load_unet,
        scheduler=scheduler,
        source=ModelSource("diffusers", path),
    )


def encoder_tokenizer(tokenizer, family: str, comp: str):
    """The tokenizer of encoder ``comp``: ``tokenizer`` (an object, a folder, or None = look one up,
    see :func:`..tokenizer.find_clip_tokenizer`) fitted with :func:`..tokenizer.fit_tokenizer`."""

    from .tokenizer import fit_tokenizer

    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tok = find_clip_tokenizer(tokenizer)
    else:
        tok = tokenizer
    tok = (
        load_tokenizer_folder(tok.name_or_path, "the tokenizer folder")
        if (Path(str(tok.name_or_path)).is_dir())
        else tok
    )
    return fit_tokenizer(tok, family, comp, copy=tok is tokenizer)


def _load_single_file(path: Path, clip_skip, tokenizer, weights_dtype=None) -> SDModel:
    sf = StateFile(path)
    family = detect_checkpoint_family(sf.keys())
    heads = metadata_json(sf, "ws_text_encoder_heads", heads_problem)
    comps = families.get(family).text_encoder_names
    toks = {c: encoder_tokenizer(tokenizer, family, c) for c in comps}
    te_sources = {c: te_checkpoint_prefix(family, c) for c in comps}
    model = _build_from_state(
        sf,
        family,
        te_sources,
        LDM_UNET_PREFIX,
        toks,
        clip_skip,
        heads,
        from_diffusers=False,
        weights_dtype=weights_dtype,
    )
    model.source = ModelSource("single_file", path, dict(sf.metadata), heads)
    return model


def model_from_state_dict(
    tensors: dict,
    family: str,
    te_sources: dict,
    unet_prefix: str,
    tokenizers: dict,
    *,
    clip_skip: int | None = None,
    te_heads: dict | None = None,
    penultimate_in_file: bool = True,
    share: bool = False,
) -> SDModel:
    """Build an :class:`SDModel` from in-memory tensors (e.g. a host's effective weights).

    ``te_sources``: component -> (key prefix, is_open_clip); transformers-format encoders use keys
    ``prefix + "text_model.encoder.layers.N..."``. ``unet_prefix``: prefix of LDM-path UNet keys
    (``"diffusion_model."`` in ComfyUI). ``penultimate_in_file``: the encoders hold all their layers
    (as in checkpoints and hosts), so SD2 reads the penultimate one. ``share``: the model's
    parameters *are* the given tensors wherever these are already float32 (views, no copy; others
    are converted as usual), so building it costs no second copy of a host's float32 weights. The
    caller must not change those tensors while the model is in use (docs/a1111.md, "Memory").
    """
    return _build_from_state(
        DictState(tensors),
        family,
        te_sources,
        unet_prefix,
        tokenizers,
        clip_skip,
        te_heads or {},
        from_diffusers=not penultimate_in_file,
        share=share,
    )


def _held(unet, weights_dtype):
    if weights_dtype is None:
        return unet
    from .precision import hold_weights

    return hold_weights(unet, weights_dtype)


def _unet_tensor(read, name: str, shape) -> torch.Tensor:
    """UNet parameter ``name`` read and shaped, or one :class:`WeightsmithError` naming it (missing or
    of the wrong size)."""
    try:
        t = read(name)
    except WeightsmithError:
        raise
    except Exception:
        raise WeightsmithError(
            f"the checkpoint lacks the UNet weight for {name} (or its layout is not one "
            "Weightsmith understands); the file is damaged or incomplete."
        ) from None
    if t.numel() != torch.Size(shape).numel():
        raise WeightsmithError(
            f"the checkpoint's UNet weight for {name} has shape {tuple(t.shape)}, but the UNet its "
            f"other weights describe needs {tuple(shape)}; the file is damaged."
        )
    return t.reshape(shape)


def _build_from_state(
    sf, family, te_sources, unet_prefix, toks, clip_skip, heads, from_diffusers, weights_dtype=None, share=False
) -> SDModel:
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tes, hidden = {}, {}
    for c, (prefix, oc) in te_sources.items():
        tok = toks[c]
        try:
            cfg, has_proj = te_config_from_keys(sf, prefix, oc, heads.get(c), tok)
        except KeyError as e:
            raise WeightsmithError(
                f"the checkpoint's text encoder is incomplete: {e.args[0]} is missing. The file "
                "is damaged or not a standard SD checkpoint."
            ) from None
        if families.get(family).component(c).kind == "open_clip":  # gelu, also in transformers-format keys (ComfyUI)
            cfg.hidden_act = "gelu"
        if len(tok) > cfg.vocab_size:
            raise WeightsmithError(
                f"the tokenizer has {len(tok)} tokens but the checkpoint's text encoder only {cfg.vocab_size}; "
                "pass the tokenizer that belongs to this model with --tokenizer."
            )
        cls = CLIPTextModelWithProjection if (has_proj and c == TE2) else CLIPTextModel
        with fast_init():
            te = cls(cfg)
        hidden[c] = cfg.hidden_size
        sd = {}
        for name, ref in te.state_dict().items():
            canon = te_path(name)
            if canon.endswith("position_ids"):
                sd[name] = ref
                continue
            slot = open_clip_slot(canon, cfg.hidden_size) if oc else CheckpointSlot(canon)
            slot = CheckpointSlot(prefix + slot.key, slot.rows, slot.transposed)
            try:
                t = read_slot(sf, slot)
            except KeyError:
                raise WeightsmithError(
                    f"the checkpoint's text encoder is incomplete: {slot.key} is missing. The file is "
                    "damaged or not a standard SD checkpoint."
                ) from None
            if t.numel() != ref.numel():
                raise WeightsmithError(
                    f"the checkpoint's text-encoder weight {slot.key} has shape {tuple(t.shape)}, but the encoder "
                    f"its other weights describe needs {tuple(ref.shape)}; the file is damaged."
                )
            sd[name] = t.reshape(ref.shape).float()
        # share: the module's parameters become the tensors read (fast_init left the built ones
        # uninitialised, so they were never resident); otherwise they are copied in
        te.load_state_dict(sd, strict=False, assign=share)
        te.eval().requires_grad_(False)
        tes[c] = te
    unet_cfg = infer_unet_config(sf, family, unet_prefix)
    fam2 = detect_family([t.config for t in tes.values()], unet_cfg)
    require(fam2 == family, f"unknown model family: the key layout says {family} but the components say {fam2}.")
    layout = UNetLayout.from_config(unet_cfg)
    specs = default_encoder_specs(
        family,
        {c: t.config.num_hidden_layers for c, t in tes.items()},
        from_diffusers=from_diffusers,
        clip_skip=clip_skip,
    )

    def read_unet_weight(param_path: str) -> torch.Tensor:
        mod, _, leaf = param_path.rpartition(".")
        return sf.get(unet_prefix + layout.to_ldm(mod) + "." + leaf).float()

    def load_unet():
        from diffusers import UNet2DConditionModel

        prev = torch.get_default_dtype()
        torch.set_default_dtype(weights_dtype or torch.float32)
        try:
            with fast_init():
                u = UNet2DConditionModel(**unet_cfg)
        finally:
            torch.set_default_dtype(prev)
        u = _held(u, weights_dtype)  # norms, biases float32 before the values go in (no rounding)
        if share and weights_dtype is None:
            sd = {name: _unet_tensor(read_unet_weight, name, ref.shape) for name, ref in u.state_dict().items()}
            u.load_state_dict(sd, assign=True)
            return u.eval().requires_grad_(False)
        with torch.no_grad():  # one tensor at a time: never a second copy of the UNet
            for name, ref in u.state_dict(keep_vars=True).items():
                t = _unet_tensor(read_unet_weight, name, ref.shape)
                ref.copy_(t)
        return u.eval().requires_grad_(False)

    return SDModel(
        family=family,
        text_encoders=tes,
        tokenizers=toks,
        encoder_specs=specs,
        unet_config=unet_cfg,
        unet_loader=load_unet,
        unet_weight_reader=read_unet_weight,
        scheduler=DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
        ),
        source=ModelSource("memory", None, dict(sf.metadata), heads),
    )


# ----------------------------------------------------------------------------------------------
# writing
def _te_hidden(model: SDModel) -> dict:
    return {c: t.config.hidden_size for c, t in model.text_encoders.items()}


def to_ldm_state_dict(model: SDModel, dtype=torch.float32) -> dict:
    """The model's UNet and text encoders in LDM single-file keys (fused OpenCLIP in_proj)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict] = defaultdict(dict)
    layout = model.layout
    hidden = _te_hidden(model)
    for name, t in model.unet.state_dict().items():
        out[checkpoint_slot(f"{UNET}.{name}", model.family, layout).key] = t.to(dtype)
    for c, te in model.text_encoders.items():
        for name, t in te_params(te):
            if name.endswith("position_ids"):
                continue
            slot = checkpoint_slot(f"{c}.{name}", model.family, layout, hidden)
            t = t.t() if slot.transposed else t
            if slot.rows is not None:
                fused[slot.key][slot.rows[0]] = t
            else:
                out[slot.key] = t.to(dtype)
    for key, parts in fused.items():
        out[key] = torch.cat([parts[r] for r in sorted(parts)], 0).to(dtype)
    return out


def save_single_file(model: SDModel, path, metadata: dict | None = None, extra: dict | None = None) -> Path:
    """Write a model (e.g. a random test model) as an LDM single-file checkpoint."""
    sd = to_ldm_state_dict(model)
    sd.update(extra or {})
    ucfg = {
        k: model.unet_config[k]
        for k in ("attention_head_dim", "norm_num_groups", "sample_size", "addition_time_embed_dim")
        if k in model.unet_config
    }
    meta = {
        "ws_text_encoder_heads": json.dumps({c: t.config.num_attention_heads for c, t in model.text_encoders.items()}),
        "ws_unet_config": json.dumps(ucfg),
    }
    meta.update(metadata or {})
    atomic_save_file(sd, Path(path), meta)
    return Path(path)


def save_edited_model(model: SDModel, deltas: dict[str, torch.Tensor], out, metadata: dict | None = None) -> Path:
    """Write ``base + Δ`` in the model's own format. ``deltas``: canonical module name -> ΔW."""
    src: ModelSource = model.source
    out = Path(out)
    if src is None or src.format == "memory":
        raise WeightsmithError("this model was built in memory; save it with save_single_file first.")
    check_output_path(out, [("the input model", src.path)], "the checkpoint output")
    if src.format == "diffusers" and out.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin"):
        raise WeightsmithError(
            f"the input model is a diffusers folder, so the edited model is a folder too; "
            f"--out {out} looks like a file name. Pass a new folder name (e.g. {out.with_suffix('')})."
        )
    if src.format == "single_file":
        return _save_single_file_edit(model, deltas, out, metadata)
    return _save_diffusers_edit(model, deltas, out, metadata)


def add_deltas_to_ldm_state(sd: dict, deltas: dict, model: SDModel, source_name: str = "the checkpoint") -> dict:
    """``sd[key] += Δ`` for every canonical delta, in an LDM single-file state dict (in place on
    ``sd``'s entries, which are replaced by new tensors of the original dtype)."""
    layout, hidden = model.layout, _te_hidden(model)
    for name, d in deltas.items():
        slot = checkpoint_slot(name + ".weight", model.family, layout, hidden)
        require(
            slot.key in sd, f"{source_name} has no {slot.key}; it does not match the model the edit was computed on."
        )
        require(
            bool(torch.isfinite(d).all()),
            f"the edit's ΔW for {name} holds NaN or infinite values; nothing was written.",
        )
        base = sd[slot.key]
        upd = base.detach().to("cpu", torch.float32, copy=True)
        d = d.float().t() if slot.transposed else d.float()
        if slot.rows is not None:
            upd[slot.rows[0] : slot.rows[1]] += d.reshape(upd[slot.rows[0] : slot.rows[1]].shape)
        else:
            upd += d.reshape(upd.shape)
        new = upd.to(base.dtype)
        if not bool(torch.isfinite(new).all()):
            if not bool(torch.isfinite(base).all()):
                raise WeightsmithError(
                    f"{source_name} already holds NaN or infinite values in {slot.key}; it is "
                    "damaged: repair or re-download it. Nothing was written."
                )
            raise WeightsmithError(
                f"adding the edit to {slot.key} overflows {str(base.dtype).replace('torch.', '')} "
                f"(largest |w + Δ| = {float(upd.abs().max()):.3g}): the edit is too strong for this precision. "
                "Lower the LoRA weights or strength, or use a float32 checkpoint. Nothing was written."
            )
        sd[slot.key] = new
    return sd


def _save_single_file_edit(model, deltas, out, metadata):
    sf = StateFile(model.source.path)
    sd = {k: sf.get(k) for k in sf.keys()}
    bad = nonfinite_keys(sd)
    if bad:
        raise WeightsmithError(
            f"the input checkpoint {model.source.path.name} holds NaN or infinite values in {len(bad)} tensor(s) "
            f"(e.g. {bad[0]}); Weightsmith does not write non-finite files. Repair or re-download the "
            "checkpoint, or save only the edit (--format lora)."
        )
    add_deltas_to_ldm_state(sd, deltas, model)
    meta = dict(sf.metadata)
    meta.update(metadata or {})
    if out.suffix.lower() != ".safetensors":
        raise WeightsmithError(f"checkpoint output must end in .safetensors, not {out.suffix!r}.")
    atomic_save_file(sd, out, meta)
    return out


def _weights_file(folder: Path) -> Path:
    for n in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / n).exists():
            return folder / n
    raise WeightsmithError(
        f"{folder} holds no single .safetensors weights file (sharded or .bin weights are "
        "not supported for writing); save the model as safetensors first."
    )


def _save_diffusers_edit(model, deltas, out: Path, metadata):
    from safetensors.torch import load_file

    from .safe_io import WRITTEN, os_error_message, umask_mode

    src = Path(model.source.path)
    if out.exists():
        raise WeightsmithError(f"{out} already exists; choose a new folder name for the edited model.")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ws-", dir=out.parent))  # same filesystem: the rename is atomic
        shutil.copytree(src, tmp / "m")
        by_comp = defaultdict(dict)
        for name, d in deltas.items():
            comp, _, path = name.partition(".")
            by_comp[comp][path] = d
        for comp, ds in by_comp.items():
            wf = _weights_file(tmp / "m" / comp)
            sd = load_file(str(wf))
            for path, d in ds.items():
                cands = [path + ".weight", path.removeprefix("text_model.") + ".weight"]
                key = next((k for k in cands if k in sd), None)
                require(key is not None, f"cannot find {path} in {wf}")
                new = (sd[key].float() + d.float().reshape(sd[key].shape)).to(sd[key].dtype)
                require(
                    bool(torch.isfinite(new).all()),
                    f"{comp}/{key} of the edited model would hold NaN or infinite values (the input "
                    "already does, or the edit overflows its precision); nothing was written.",
                )
                sd[key] = new
            bad = nonfinite_keys(sd)
            require(
                not bad,
                f"the input model's {comp} holds NaN or infinite values (e.g. {bad[:1]}); "
                "Weightsmith does not write non-finite files. Nothing was written.",
            )
            wf.unlink()  # the copy, replaced inside the temp folder (the folder's rename is the atomic step)
            with open(wf, "wb") as f:  # the one deterministic writer: same edit, same bytes
                write_safetensors(f, sd, {"format": "pt", **(metadata or {})})
        for root, _dirs, files in os.walk(tmp / "m"):  # modes as a plain write gives (mkdtemp
            os.chmod(root, umask_mode(0o777))  # would leave 0700)
            for f in files:
                os.chmod(os.path.join(root, f), umask_mode(0o666))
        os.replace(tmp / "m", out)
    except OSError as e:
        raise WeightsmithError(os_error_message(e, out)) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    WRITTEN.append(out)
    return out
