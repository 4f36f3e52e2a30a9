"""Reading and writing Flux.1 models as users have them (docs/flux.md, "Files Weightsmith reads").

``--model`` is a BFL transformer file (``flux1-dev.safetensors``), a ComfyUI all-in-one checkpoint or a
diffusers folder; ``--text-encoder FILE`` (repeatable) adds CLIP-L and T5-XXL files, each recognised by
its keys (as ComfyUI's ``DualCLIPLoader`` takes them). dev or schnell comes from the keys
(``guidance_in``). Nothing is read whole: the transformer stays in its file, T5 runs layer by layer
(:mod:`.fluxmodel`).

Edits are written in the input's layout (:func:`save_flux_edit`): a BFL file gives a BFL file, an
all-in-one checkpoint an all-in-one checkpoint, a diffusers folder a folder; an edited text encoder
that came as a file of its own is written as a file of its own beside ``--out``. Each tensor is
streamed (:func:`.safe_io.atomic_save_streamed`), so a 23.8 GB transformer is copied with one tensor in
memory. Weights stored in bf16/fp16/fp8 are written back in their dtype (ComfyUI's scaled fp8 with its
scale); how much of each ΔW the stored dtype keeps is measured and reported, and nothing non-finite
is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import WeightsmithError, require
from .fluxmodel import FluxModel, Part, T5Encoder
from .layouts.flux import (
    CLIP_L,
    T5,
    TRANSFORMER,
    dtype_of,
    read_weight,
    scale_key,
    t5_config_from_keys,
    text_encoders_in,
    transformer_layout,
    variant,
)
from .safe_io import check_input
from .state_files import ShardedState, StateFile
from .tokenizer import T5_LENGTH, find_clip_tokenizer, load_t5_tokenizer, load_tokenizer_folder

TE_LABELS = {CLIP_L: "clip_l", T5: "t5xxl"}
_LABEL = {CLIP_L: "CLIP-L", T5: "T5"}


@dataclass
class FluxSource:
    format: str  # "bfl" | "comfy" | "diffusers"
    path: Path
    text_encoder_files: dict = field(default_factory=dict)  # component -> path of a separate file
    metadata: dict = field(default_factory=dict)


def add_text_encoder_argument(p) -> None:
    """``--text-encoder FILE`` (repeatable), the same in every command that reads a Flux model."""
    p.add_argument(
        "--text-encoder",
        action="append",
        default=[],
        metavar="FILE",
        help="Flux: a text-encoder file (CLIP-L, T5-XXL in fp16/bf16/fp8), repeatable, each recognised by its "
        "keys, as ComfyUI's DualCLIPLoader takes them (docs/flux.md)",
    )


def require_flux_format(fmt: str, what: str = "edited") -> None:
    """A Flux edit or merge is written as a checkpoint or a LoRA; the full-delta ``diff`` format is not
    (diffusers loads no ``.diff`` file). One rule for erase and merge, asked before the model is read."""
    require(
        fmt in ("checkpoint", "lora"),
        f"--format {fmt} is not written for Flux: use --format checkpoint (the {what} model in its input's "
        "layout) or --format lora (a Flux LoRA every host loads, its T5 part as a T5 file beside it; docs/flux.md).",
    )


def is_flux(path) -> bool:
    """Whether ``path`` (a file or folder) holds a Flux transformer (recognised from keys)."""
    path = Path(path)
    try:
        if path.is_dir():
            t = path / "transformer"
            if not t.is_dir():
                return False
            return transformer_layout(ShardedState(t, "diffusion_pytorch_model").keys()) is not None
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            return False
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return transformer_layout(list(f.keys())) is not None
    except Exception:
        return False


def _clip_model(part: Part, tok, heads: int | None):
    from transformers import CLIPTextModel

    from .layouts.flux import clip_config_from_keys

    try:
        cfg = clip_config_from_keys(part.state, part.prefix, heads)
    except (KeyError, ValueError) as e:
        raise WeightsmithError(
            f"the CLIP-L text encoder in {part.path} is incomplete ({e}); the file is damaged."
        ) from None
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    with torch.device("meta"):
        te = CLIPTextModel(cfg)
    sd = {}
    ks = set(part.state.keys())
    for name, ref in te.state_dict().items():
        key = part.prefix + name.removeprefix("text_model.")
        if key not in ks:
            raise WeightsmithError(f"the CLIP-L text encoder in {part.path} lacks {key}; the file is damaged.")
        t = read_weight(part.state, key)
        if tuple(t.shape) != tuple(ref.shape):
            raise WeightsmithError(
                f"the CLIP-L weight {key} has shape {tuple(t.shape)}, but the encoder its other weights describe "
                f"needs {tuple(ref.shape)}; the file is damaged."
            )
        sd[name] = t
    te.load_state_dict(sd, assign=True)
    for name, buf in list(te.named_buffers()):  # non-persistent buffers are not in the state dict
        if buf.is_meta:
            require(name.endswith("position_ids"), f"internal: CLIP buffer {name} was not filled.")
            mod = te.get_submodule(name.rpartition(".")[0])
            mod.register_buffer("position_ids", torch.arange(buf.shape[-1]).reshape(buf.shape), persistent=False)
    return te.eval().requires_grad_(False)


def _te_file_parts(files) -> dict[str, Part]:
    out: dict[str, Part] = {}
    for f in files or ():
        f = Path(f)
        if not os.path.lexists(f):
            raise WeightsmithError(f"--text-encoder {f} not found; pass a CLIP-L or T5-XXL .safetensors file.")
        if f.is_dir():
            raise WeightsmithError(
                f"--text-encoder {f} is a folder; pass a text-encoder .safetensors file (a diffusers folder "
                "brings its own text_encoder/ and text_encoder_2/ through --model)."
            )
        sf = StateFile(check_input(f, "the text-encoder file"), mapped=False)
        found = text_encoders_in(sf.keys())
        if not found:
            if transformer_layout(sf.keys()) is not None:
                raise WeightsmithError(
                    f"--text-encoder {f} is a Flux transformer, not a text encoder; pass it to --model."
                )
            raise WeightsmithError(
                f"--text-encoder {f} is neither a CLIP-L nor a T5 text encoder (no text_model.* or "
                "encoder.block.* weights). Pass clip_l.safetensors or a t5xxl_*.safetensors file."
            )
        for comp, prefix in found.items():
            if comp in out:
                raise WeightsmithError(
                    f"two {_LABEL[comp]} text encoders given ({out[comp].path} and {f}); pass one of each."
                )
            out[comp] = Part(sf, prefix, "hf", f, "file")
    return out


def load_flux(path, text_encoders=(), *, t5_length: int = T5_LENGTH, tokenizer=None) -> FluxModel:
    """A Flux.1 model from ``path`` (BFL file, ComfyUI all-in-one checkpoint or diffusers folder) and
    the separate text-encoder files ``text_encoders``. ``t5_length``: T5 tokens (256 as ComfyUI and
    Forge; 512 as diffusers' dev default). ``tokenizer``: a CLIP tokenizer folder (default: the model
    folder's, else the shipped vocabulary); T5's tokenizer is the folder's ``tokenizer_2/`` or the
    shipped one."""
    path = Path(path)
    if not os.path.lexists(path):
        raise WeightsmithError(f"model not found: {path}. Pass a Flux .safetensors file or a diffusers folder.")
    check_input(path, "the model", folder_ok=True)
    parts: dict[str, Part] = {}
    tok_dirs: dict[str, Path] = {}
    heads = None
    if path.is_dir():
        require(
            (path / "transformer").is_dir(),
            f"{path} is a folder without transformer/; pass a diffusers Flux folder or a .safetensors file.",
        )
        st = ShardedState(path / "transformer", "diffusion_pytorch_model", mapped=False)
        lay = transformer_layout(st.keys())
        require(lay is not None, f"{path}/transformer holds no Flux transformer weights.")
        parts[TRANSFORMER] = Part(st, "", lay[0], path / "transformer", "folder")
        for comp in (CLIP_L, T5):
            if (path / comp).is_dir():
                parts[comp] = Part(ShardedState(path / comp, "model", mapped=False), "", "hf", path / comp, "folder")
        for comp, sub in ((CLIP_L, "tokenizer"), (T5, "tokenizer_2")):
            if (path / sub).is_dir():
                tok_dirs[comp] = path / sub
        cfg = path / CLIP_L / "config.json"
        if cfg.is_file():
            try:
                heads = int(json.loads(cfg.read_text(encoding="utf-8"))["num_attention_heads"])
            except (ValueError, KeyError, TypeError):
                heads = None
        fmt, meta = "diffusers", {}
    else:
        sf = StateFile(path, mapped=False)
        lay = transformer_layout(sf.keys())
        if lay is None:
            found = text_encoders_in(sf.keys())
            if found:
                raise WeightsmithError(
                    f"{path.name} is a {' and '.join(_LABEL[c] for c in found)} text encoder, not a Flux model; "
                    "pass the transformer (or all-in-one checkpoint) to --model and this file to --text-encoder."
                )
            raise WeightsmithError(f"{path.name} holds no Flux transformer (no double_blocks.* / img_in weights).")
        parts[TRANSFORMER] = Part(sf, lay[1], "bfl", path, "file" if lay[1] == "" else "checkpoint")
        for comp, prefix in text_encoders_in(sf.keys()).items():
            parts[comp] = Part(sf, prefix, "hf", path, "checkpoint")
        fmt, meta = ("bfl" if lay[1] == "" else "comfy"), dict(sf.metadata)
    extra = _te_file_parts(text_encoders)
    parts.update(extra)  # a file given explicitly replaces the checkpoint's own encoder
    tp = parts[TRANSFORMER]
    var = variant(tp.state.keys(), tp.layout, tp.prefix)

    for comp in extra:  # a text-encoder file given explicitly does not take the folder's tokenizer
        tok_dirs.pop(comp, None)
    src = FluxSource(fmt, path, {c: p.path for c, p in extra.items()}, meta)
    return assemble(parts, var, tok_dirs=tok_dirs, heads=heads, tokenizer=tokenizer, t5_length=t5_length, source=src)


def assemble(
    parts: dict[str, Part],
    var: str,
    *,
    tok_dirs: dict | None = None,
    heads: int | None = None,
    tokenizer=None,
    t5_length: int = T5_LENGTH,
    source=None,
    clip_tokenizer_dirs=(),
) -> FluxModel:
    """A :class:`~.fluxmodel.FluxModel` from located ``parts`` (component -> :class:`~.fluxmodel.Part`):
    tokenizers (``tokenizer``: a CLIP tokenizer folder; ``tok_dirs``: the model's own tokenizer folders;
    ``clip_tokenizer_dirs``: a host's CLIP tokenizer folders; else the shipped vocabularies), CLIP-L
    built in float32, T5 layer-wise, and each text encoder's width checked against the transformer.
    :func:`load_flux` (files) and :mod:`.flux_host` (a host's weights) both end here."""
    tok_dirs = tok_dirs or {}
    toks: dict[str, object] = {}
    clip = t5 = None
    if CLIP_L in parts:
        if tokenizer is not None:
            tok = load_tokenizer_folder(tokenizer, "--tokenizer")
        elif CLIP_L in tok_dirs:
            tok = load_tokenizer_folder(tok_dirs[CLIP_L], "the model's tokenizer folder")
        else:
            tok = find_clip_tokenizer(host_dirs=clip_tokenizer_dirs)
        tok.model_max_length = 77
        toks[CLIP_L] = tok
        clip = _clip_model(parts[CLIP_L], tok, heads)
    if T5 in parts:
        p = parts[T5]
        try:
            cfg = t5_config_from_keys(p.state, p.prefix)
        except KeyError as e:
            raise WeightsmithError(f"the T5 text encoder in {p.path} lacks {e.args[0]}; the file is damaged.") from None
        toks[T5] = load_t5_tokenizer(tok_dirs.get(T5), t5_length)
        if len(toks[T5]) > cfg.vocab_size:
            raise WeightsmithError(
                f"the T5 tokenizer has {len(toks[T5])} tokens but the T5 encoder in {p.path} only {cfg.vocab_size}; "
                "the encoder is not Flux's T5-XXL."
            )
        t5 = T5Encoder(p, cfg)
    for comp, want in ((CLIP_L, "pooled_projection_dim"), (T5, "joint_attention_dim")):
        if comp in parts:
            width = clip.config.hidden_size if comp == CLIP_L else t5.config.d_model
            name = "time_text_embed.text_embedder.linear_1" if comp == CLIP_L else "context_embedder"
            tpart = parts[TRANSFORMER]
            from .layouts.flux import transformer_key

            cols = tpart.state.shape(transformer_key(name, tpart.layout, tpart.prefix))[1]
            if cols != width:
                raise WeightsmithError(
                    f"the {_LABEL[comp]} text encoder ({parts[comp].path}) is {width} wide, but the transformer "
                    f"reads {cols} ({want}); the text encoder does not belong to this model."
                )
    return FluxModel(var, parts, clip, t5, toks, source=source)


class _PrefixView:
    """The keys of ``state`` under ``prefix``, with the prefix removed (read lazily, one tensor at a time)."""

    def __init__(self, state, prefix: str):
        self.state, self.prefix = state, prefix

    def keys(self):
        n = len(self.prefix)
        return [k[n:] for k in self.state.keys() if k.startswith(self.prefix)]

    def get(self, key: str) -> torch.Tensor:
        return self.state.get(self.prefix + key)


def t5_base(model: FluxModel):
    """The loaded model's T5 weights as HF ``T5EncoderModel`` keys (a lazy reader with ``keys()``/``get()``),
    wherever they are stored (its own file, an all-in-one checkpoint, a diffusers folder): the base a Flux
    LoRA's T5 part is added to (:func:`~weightsmith.core.lora_write.save_flux_lora`, ``t5_base``)."""
    model.require_text_encoders("writing the T5 part of a Flux LoRA")
    part = model.parts[T5]
    return _PrefixView(part.state, part.prefix) if part.prefix else part.state


# ----------------------------------------------------------------------------------------------
# writing
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def store_like(new_eff: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None):
    """``new_eff`` (float32, effective values) in a stored ``dtype``: ``(stored tensor, scale)``. ComfyUI's
    scaled fp8 keeps its ``scale`` unless the edited values need a larger one (then the scale grows, so
    nothing saturates); plain fp8 saturates at its largest value (fp8 has no infinity)."""
    if scale is not None:
        m = _FP8_MAX.get(dtype)
        if m is not None:
            need = float(new_eff.abs().max()) / m
            if need > float(scale.float()):
                scale = torch.tensor(need, dtype=torch.float32).to(scale.dtype).reshape(scale.shape)
                if float(scale.float()) * m < float(new_eff.abs().max()):  # rounding of a half-precision scale
                    scale = (scale.float() * (1 + 2**-7)).to(scale.dtype)
        new_eff = new_eff / scale.float()
    if dtype in _FP8_MAX:
        m = _FP8_MAX[dtype]
        return new_eff.clamp(-m, m).to(dtype), scale
    return new_eff.to(dtype), scale


def _edited(state, key: str, delta: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The stored tensor of ``key`` plus ``delta`` in the key's own dtype (and its scale, for ComfyUI's scaled
    fp8), and how much of ``delta`` that dtype kept: ``kept`` = ⟨ΔW_written, ΔW⟩/‖ΔW‖², ``rel_error`` =
    ‖ΔW_written − ΔW‖/‖ΔW‖, ``saturated``: values clipped at plain fp8's largest."""
    stored = state.get(key)
    sk = scale_key(key)
    keys = state.files if hasattr(state, "files") else set(state.keys())
    scale = state.get(sk) if sk in keys else None
    base = read_weight(state, key)
    d = delta.detach().float().reshape(base.shape)
    require(
        bool(torch.isfinite(d).all()), f"the edit's ΔW for {where} holds NaN or infinite values; nothing was written."
    )
    new, new_scale = store_like(base + d, stored.dtype, scale)
    back = new.float() * new_scale.float() if new_scale is not None else new.float()
    if not bool(torch.isfinite(back).all()):
        raise WeightsmithError(
            f"adding the edit to {key} overflows {str(stored.dtype).replace('torch.', '')} (largest |w + Δ| = "
            f"{float((base + d).abs().max()):.3g}); the edit is too strong for this precision. Nothing was written."
        )
    dw = back - base
    dn = float(d.double().norm())
    m = _FP8_MAX.get(stored.dtype)
    info = {
        "key": key,
        "dtype": str(stored.dtype).replace("torch.", ""),
        "scaled": scale is not None,
        "kept": float((dw.double() * d.double()).sum() / dn**2) if dn else 1.0,
        "rel_error": float((dw.double() - d.double()).norm() / dn) if dn else 0.0,
        "saturated": int(((base + d).abs() > m).sum()) if (m is not None and scale is None) else 0,
    }
    if scale is not None and not torch.equal(new_scale, scale):
        info["scale_grew"] = float(new_scale.float() / scale.float())
    return new, new_scale, info


class _Edits:
    """The edited tensors of one state, each computed once when its weight or its scale is written."""

    def __init__(self, state, edits: dict, report: dict, label=lambda k: k):
        self.state, self.edits, self.report, self.label = state, edits, report, label
        keys = set(state.keys())
        self.scales = {scale_key(k): k for k in edits if scale_key(k) in keys}
        self.done: dict = {}  # weight key -> (new, scale, reads left): held only until both are written

    def _get(self, wkey, i: int):
        if wkey not in self.done:
            new, scale, info = _edited(self.state, wkey, self.edits[wkey], wkey)
            self.done[wkey] = [new, scale, 2 if scale_key(wkey) in self.scales else 1]
            self.report[self.label(wkey)] = info
        got = self.done[wkey]
        got[2] -= 1
        if got[2] <= 0:
            del self.done[wkey]
        return got[i]

    def __call__(self, k):
        if k in self.edits:
            return self._get(k, 0)
        if k in self.scales:
            return self._get(self.scales[k], 1)
        return self.state.get(k)


def _write_state(state, edits: dict[str, torch.Tensor], out: Path, metadata: dict, written: list, report: dict) -> None:
    """Copy every tensor of ``state`` to ``out`` (streamed), ``edits`` (stored key -> ΔW) added."""
    from .safe_io import atomic_save_streamed

    meta = {k: (dtype_of(state, k), state.shape(k)) for k in state.keys()}
    missing = [k for k in edits if k not in meta]
    require(not missing, f"the model has no {missing[0] if missing else ''}; the edit was computed for another model.")
    atomic_save_streamed(meta, _Edits(state, edits, report), out, metadata)
    written.append(out)


class _StoredDeltas(Mapping):
    """Stored key -> ΔW of that stored tensor, formed when read from the canonical deltas (a fused BFL
    tensor gets each module's rows; ``norm_out``'s halves are swapped back): one at a time."""

    def __init__(self, deltas, pieces: dict, state):
        self.deltas, self.pieces, self.state = deltas, pieces, state

    def __getitem__(self, key):
        got = self.pieces[key]
        if len(got) == 1 and got[0][0] is None:
            return self.deltas[got[0][1]]
        from .layouts.flux_names import add_piece

        out = torch.zeros(tuple(self.state.shape(key)), dtype=torch.float32)
        for piece, name in got:
            add_piece(out, self.deltas[name].detach().float(), piece)
        return out

    def __contains__(self, key):  # Mapping's default would form ΔW to answer
        return key in self.pieces

    def __iter__(self):
        return iter(self.pieces)

    def __len__(self):
        return len(self.pieces)

    def only(self, keys) -> _StoredDeltas:
        """The same view restricted to ``keys`` (one shard of a diffusers folder)."""
        return _StoredDeltas(self.deltas, {k: self.pieces[k] for k in keys}, self.state)


def save_flux_edit(model: FluxModel, deltas: dict, out, metadata: dict | None = None) -> dict:
    """Write ``base + ΔW`` in the model's own layout. ``deltas``: canonical module -> ΔW. Returns
    ``{"files": [written paths], "stored": {stored key: kept/rel_error}}`` (docs/flux.md, "fp8")."""
    from .safe_io import check_paths

    src: FluxSource = model.source
    require(src is not None, "this Flux model was built in memory; it has no file to write an edit into.")
    out = Path(out)
    by_part: dict[int, dict] = defaultdict(dict)
    part_of: dict[int, Part] = {}
    pieces: dict[str, list] = defaultdict(list)  # stored key -> [(piece, canonical)] of fused tensors
    for name in deltas:
        try:
            part, key, piece = model.stored_piece(name)
        except KeyError:
            raise WeightsmithError(
                f"the edit changes {name}, which this Flux model does not have; it was computed for another model."
            ) from None
        pieces[key].append((piece, name))
        part_of[id(part.state)] = part
        by_part[id(part.state)][key] = None
    for sid in by_part:
        by_part[sid] = _StoredDeltas(deltas, {k: pieces[k] for k in by_part[sid]}, part_of[sid].state)
    meta = dict(src.metadata)
    meta.update(metadata or {})
    inputs = {"the input model (--model)": src.path}
    inputs.update({f"the text-encoder file {p}": p for p in src.text_encoder_files.values()})
    written: list = []
    stored: dict = {}
    if src.format == "diffusers":
        check_paths({"--out": out}, inputs)
        require(
            out.suffix.lower() != ".safetensors",
            f"the input model is a diffusers folder, so the edited model is a folder too; --out {out} is a file name. "
            f"Pass a new folder name (e.g. {out.with_suffix('')}).",
        )
        require(not out.exists(), f"{out} already exists; choose a new folder name for the edited model.")
    else:
        require(
            out.suffix.lower() == ".safetensors", f"the edited Flux model is a .safetensors file; --out {out} is not."
        )
    # separate text-encoder files edited: written beside --out as <out stem>.<clip_l|t5xxl>.safetensors
    side = {}
    for sid, part in part_of.items():
        if part.container == "file" and part.path != src.path:
            comp = next(c for c, p in model.parts.items() if p is part)
            side[sid] = (
                out.parent / f"{out.stem if src.format != 'diffusers' else out.name}.{TE_LABELS[comp]}.safetensors"
            )
    check_paths({"--out": out, **{f"the edited {p.name}": p for p in side.values()}}, inputs)
    if src.format == "diffusers":
        _save_folder(model, src, by_part, part_of, out, meta, written, stored)
    else:
        main = id(model.parts[TRANSFORMER].state)
        _write_state(model.parts[TRANSFORMER].state, by_part.get(main, {}), out, meta, written, stored)
    for sid, path in side.items():
        part = part_of[sid]
        _write_state(part.state, by_part[sid], path, {**dict(part.state.metadata), **(metadata or {})}, written, stored)
    return {"files": [str(p) for p in written], "stored": stored}


def _save_folder(model, src, by_part, part_of, out: Path, meta, written, stored) -> None:
    from .safe_io import WRITTEN, atomic_save_streamed, os_error_message, umask_mode

    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ws-", dir=out.parent))
        shutil.copytree(src.path, tmp / "m")
        for sid, edits in by_part.items():
            part = part_of[sid]
            if part.container != "folder":
                continue
            state: ShardedState = part.state
            shards = defaultdict(list)
            for key in edits:  # the keys only: each ΔW is formed when its shard is written
                shards[state.files[key]].append(key)
            for shard, keys in shards.items():
                ed = edits.only(keys) if isinstance(edits, _StoredDeltas) else {k: edits[k] for k in keys}
                rel = Path(shard.path).relative_to(src.path)
                target = tmp / "m" / rel
                target.unlink()
                m = {k: (dtype_of(shard, k), shard.shape(k)) for k in shard.keys()}
                get = _Edits(shard, ed, stored, lambda k, rel=rel: f"{rel.parent.as_posix()}/{k}")
                atomic_save_streamed(m, get, target, {"format": "pt", **dict(shard.metadata)})
        for root, _dirs, files in os.walk(tmp / "m"):
            os.chmod(root, umask_mode(0o777))
            for f in files:
                os.chmod(os.path.join(root, f), umask_mode(0o666))
        os.replace(tmp / "m", out)
    except OSError as e:
        raise WeightsmithError(os_error_message(e, out)) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    WRITTEN.append(out)
    written.append(out)
