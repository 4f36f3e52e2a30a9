"""Flux.1 key layouts (docs/flux.md, "Files Weightsmith reads"): which file or folder holds which
component, dev or schnell, and the text encoders' configs from their tensor shapes.

Layouts of the transformer: the BFL single file (bare ``double_blocks.…`` names, ``flux1-dev.safetensors``),
ComfyUI's all-in-one checkpoint (``model.diffusion_model.<BFL>``, ``text_encoders.clip_l.transformer.…``,
``text_encoders.t5xxl.transformer.…``) and a diffusers ``transformer/`` (diffusers names). Text encoders
come as separate files (HF ``CLIPTextModel`` / ``T5EncoderModel`` keys, fp16/bf16/fp8, ComfyUI's scaled
fp8 with a ``scale_weight`` per linear), inside an all-in-one checkpoint, or as a diffusers folder's
``text_encoder/`` and ``text_encoder_2/``. Everything is recognised from keys, never from a file name.

Canonical names (what an :class:`~weightsmith.core.edit.Edit` holds) are the diffusers component
plus the diffusers module path: ``transformer.context_embedder`` (BFL ``txt_in``),
``transformer.time_text_embed.text_embedder.linear_1`` (``vector_in.in_layer``),
``text_encoder_2.encoder.block.3.layer.0.SelfAttention.k`` (T5), ``text_encoder.text_model.…`` (CLIP-L).
"""

from __future__ import annotations

import re

from ..errors import WeightsmithError, require
from .flux_names import CLIP_L, T5, TOP, TRANSFORMER  # noqa: F401  (component names, re-exported)

COMFY_MODEL_PREFIX = "model.diffusion_model."
COMFY_TE_PREFIX = {CLIP_L: "text_encoders.clip_l.transformer.", T5: "text_encoders.t5xxl.transformer."}
#: the transformer's text-only input projections: diffusers module -> BFL module (names: .flux_names)
TEXT_INPUTS = {TOP[b]: b for b in ("txt_in", "vector_in.in_layer")}
#: ComfyUI's scaled fp8: per-linear scale tensor (effective weight = fp8 weight · scale) and the marker
SCALE_WEIGHT = ".scale_weight"
SCALED_FP8_MARKER = "scaled_fp8"

_BFL_MARK = "double_blocks.0.img_attn.norm.key_norm.scale"
_DIFFUSERS_MARK = "transformer_blocks.0.attn.norm_added_k.weight"
_T5_MARK = "encoder.block.0.layer.0.SelfAttention.k.weight"
_CLIP_MARK = "text_model.final_layer_norm.weight"


def transformer_layout(keys) -> tuple[str, str] | None:
    """``("bfl", prefix)`` (``prefix`` "" for a BFL file, ``model.diffusion_model.`` in a ComfyUI
    checkpoint), ``("diffusers", "")`` for diffusers transformer weights, or None: no Flux transformer."""
    ks = set(keys)
    for prefix in ("", COMFY_MODEL_PREFIX, "diffusion_model."):
        if prefix + _BFL_MARK in ks and prefix + "img_in.weight" in ks:
            return "bfl", prefix
    if _DIFFUSERS_MARK in ks and "x_embedder.weight" in ks and "context_embedder.weight" in ks:
        return "diffusers", ""
    return None


def variant(keys, layout: str, prefix: str = "") -> str:
    """``"dev"`` when the transformer has the guidance embedder (``guidance_in``), else ``"schnell"``
    (as ComfyUI, Forge and diffusers decide; never from a file name)."""
    key = "guidance_in.in_layer.weight" if layout == "bfl" else "time_text_embed.guidance_embedder.linear_1.weight"
    return "dev" if prefix + key in set(keys) else "schnell"


def text_encoders_in(keys) -> dict[str, str]:
    """The text encoders a file holds: component (``text_encoder`` = CLIP-L, ``text_encoder_2`` = T5)
    -> key prefix. A separate file has bare HF keys; an all-in-one checkpoint ComfyUI's prefixes."""
    ks = set(keys)
    out = {}
    for comp, mark in ((CLIP_L, _CLIP_MARK), (T5, _T5_MARK)):
        for prefix in ("", COMFY_TE_PREFIX[comp], COMFY_TE_PREFIX[comp].removeprefix("text_encoders.")):
            if prefix + mark in ks:
                # CLIP-L: the prefix of its module paths (files keep ``text_model.``, transformers 5's
                # save_pretrained drops it)
                out[comp] = prefix + ("text_model." if comp == CLIP_L else "")
                break
            if comp == CLIP_L and prefix + _CLIP_MARK.removeprefix("text_model.") in ks:
                if prefix + "encoder.layers.0.self_attn.q_proj.weight" in ks:
                    out[comp] = prefix
                    break
    return out


def clip_config_from_keys(sf, prefix: str, heads: int | None = None):
    """A transformers ``CLIPTextConfig`` for a CLIP text encoder whose module paths (``embeddings.…``,
    ``encoder.layers.N.…``) start at ``prefix``; heads from ``heads`` or width / 64 (CLIP-L: 12)."""
    from transformers import CLIPTextConfig

    emb = sf.shape(prefix + "embeddings.token_embedding.weight")
    pos = sf.shape(prefix + "embeddings.position_embedding.weight")
    fc1 = sf.shape(prefix + "encoder.layers.0.mlp.fc1.weight")
    layer_re = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    n = 1 + max(int(m.group(1)) for k in sf.keys() if (m := layer_re.match(k)))
    hidden = emb[1]
    heads = heads or max(1, hidden // 64)
    require(hidden % heads == 0, f"the CLIP text encoder's width {hidden} is not a multiple of {heads} heads.")
    return CLIPTextConfig(
        vocab_size=emb[0],
        hidden_size=hidden,
        intermediate_size=fc1[0],
        num_hidden_layers=n,
        num_attention_heads=heads,
        max_position_embeddings=pos[0],
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def transformer_key(module: str, layout: str, prefix: str = "") -> str:
    """The stored weight key of a transformer text-input module (diffusers path) in a layout."""
    require(module in TEXT_INPUTS, f"{module} is not a Flux text-input projection Weightsmith edits.")
    return prefix + (TEXT_INPUTS[module] if layout == "bfl" else module) + ".weight"


def t5_config_from_keys(sf, prefix: str = ""):
    """A transformers ``T5Config`` (encoder only) from a T5 encoder's tensor shapes: width, layers,
    heads (from the relative-attention bias), feed-forward width and vocabulary, any size. Flux's
    T5-XXL: 4096 wide, 24 layers, 64 heads of 64, gated GELU (tanh) 10240, vocabulary 32128."""
    from transformers import T5Config

    ks = set(sf.keys())
    emb = next((prefix + k for k in ("shared.weight", "encoder.embed_tokens.weight") if prefix + k in ks), None)
    require(
        emb is not None,
        "the T5 text encoder has no token embedding (shared.weight); the file is damaged or incomplete.",
    )
    layer_re = re.compile(re.escape(prefix) + r"encoder\.block\.(\d+)\.")
    found = {int(m.group(1)) for k in ks if (m := layer_re.match(k))}
    require(bool(found), "the T5 text encoder has no layers (encoder.block.N); the file is damaged.")
    n = 1 + max(found)
    missing = [i for i in range(n) if i not in found]
    require(
        not missing,
        f"the T5 text encoder lacks layer {missing[0] if missing else 0} of {n}; the file is damaged or incomplete.",
    )
    vocab, d_model = sf.shape(emb)
    rel = prefix + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    require(rel in ks, f"the T5 text encoder lacks {rel}; the file is damaged or not a T5 encoder.")
    buckets, heads = sf.shape(rel)
    inner = sf.shape(prefix + "encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gated = prefix + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in ks
    wi = prefix + "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
    require(wi in ks, f"the T5 text encoder lacks {wi}; the file is damaged.")
    if inner % heads:
        raise WeightsmithError(
            f"the T5 text encoder's attention width {inner} is not a multiple of its {heads} heads; "
            "the file is damaged."
        )
    cfg = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=sf.shape(wi)[0],
        num_layers=n,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dense_act_fn="gelu_pytorch_tanh" if gated else "relu",
        is_gated_act=gated,
        is_encoder_decoder=False,
        use_cache=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    cfg.dense_act_fn = "gelu_pytorch_tanh" if gated else "relu"
    cfg._attn_implementation = "sdpa"  # as T5EncoderModel runs by default (blocks are built standalone)
    return cfg


def t5_block_keys(sf, prefix: str, i: int) -> list[str]:
    """The stored keys of T5 block ``i`` (weights and their scales)."""
    p = f"{prefix}encoder.block.{i}."
    return [k for k in sf.keys() if k.startswith(p)]


def dtype_of(sf, key: str):
    """The stored torch dtype of ``key`` without reading it (None when unknown)."""
    import torch

    part = getattr(sf, "files", {}).get(key, sf)
    f = getattr(part, "_f", None)
    if f is None:
        return sf.get(key).dtype
    names = {
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F64": torch.float64,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }
    return names.get(f.get_slice(key).get_dtype())


def scale_key(weight_key: str) -> str:
    """ComfyUI's scaled-fp8 scale tensor of a ``….weight`` key."""
    return weight_key.removesuffix(".weight") + SCALE_WEIGHT


def read_weight(sf, key: str):
    """The effective float32 value of a stored weight: fp8 values times their ``scale_weight`` where the
    file is ComfyUI's scaled fp8, the stored values otherwise (one tensor, never the whole file)."""
    import torch

    t = sf.get(key)
    s = scale_key(key)
    keys = sf.files if hasattr(sf, "files") else set(sf.keys())
    if s in keys:
        return t.float() * sf.get(s).float()
    return t.to(torch.float32)


def require_finite(name: str, t) -> None:
    """Refuse a weight IterIS would sample that holds NaN/Inf, naming it."""
    import torch

    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise WeightsmithError(
            f"the model's weight {name} holds NaN or infinite values; the model file is damaged, so IterIS "
            "cannot sample it. Use an intact copy of the model."
        )


def load_params(module, read, label: str, finite: bool = False, names=None) -> None:
    """Give ``module`` (built on the ``meta`` device) its parameters: ``read(name)`` for each parameter name
    inside it (``names``: only these), its shape checked against the module's (``label``: the stored name
    of the module, for the message); ``finite``: also refuse NaN/Inf (:func:`require_finite`)."""
    sd = {}
    params = dict(module.named_parameters())
    for n in params if names is None else names:
        p, t = params[n], read(n)
        if finite:
            require_finite(f"{label}.{n}", t)
        if tuple(t.shape) != tuple(p.shape):
            raise WeightsmithError(
                f"the weight {label}.{n} has shape {tuple(t.shape)}, but the model its other weights describe "
                f"needs {tuple(p.shape)}; the file is damaged."
            )
        sd[n] = t
    module.load_state_dict(sd, assign=True, strict=False)
