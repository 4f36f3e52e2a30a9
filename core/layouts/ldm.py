"""The LDM/CompVis key layout of SD1.x, SD2.x and SDXL single-file checkpoints (as ComfyUI, A1111
and Forge use): the text encoders' and the UNet's configs inferred from tensor names and shapes, at
any width, without hub look-ups. ``sf``: a :class:`~weightsmith.core.state_files.StateFile` or
:class:`~weightsmith.core.state_files.DictState`.
"""

from __future__ import annotations

import json
import re

from .. import families
from ..errors import WeightsmithError, require
from ..naming import LDM_UNET_PREFIX


def te_config_from_keys(sf, prefix: str, open_clip: bool, heads: int | None, tok):
    """A transformers ``CLIPTextConfig`` for the text encoder under key ``prefix`` (OpenCLIP or
    transformers key names) from its tensor shapes, and whether it has a text projection.
    ``heads``: the attention heads when known (checkpoint metadata), else width / 64."""
    from transformers import CLIPTextConfig

    if open_clip:
        emb = sf.shape(prefix + "token_embedding.weight")
        pos = sf.shape(prefix + "positional_embedding")
        layer_re = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
        fc1 = sf.shape(prefix + "transformer.resblocks.0.mlp.c_fc.weight")
        proj = prefix + "text_projection"
    else:
        emb = sf.shape(prefix + "text_model.embeddings.token_embedding.weight")
        pos = sf.shape(prefix + "text_model.embeddings.position_embedding.weight")
        layer_re = re.compile(re.escape(prefix) + r"text_model\.encoder\.layers\.(\d+)\.")
        fc1 = sf.shape(prefix + "text_model.encoder.layers.0.mlp.fc1.weight")
        proj = prefix + "text_projection.weight"
    found = [int(m.group(1)) for k in sf.keys() if (m := layer_re.match(k))]
    if not found:
        raise WeightsmithError(
            f"the checkpoint's text encoder has no layers (no {layer_re.pattern[:-7]}… "
            "weights); the file is damaged or not a complete SD checkpoint."
        )
    layers = 1 + max(found)
    hidden = emb[1]
    if heads is not None and hidden % heads:
        raise WeightsmithError(
            f"the checkpoint's metadata entry ws_text_encoder_heads says {heads} attention heads, which do not "
            f"divide the text encoder's width {hidden} (from its weights). The file was edited or damaged: "
            "remove the entry or export the file again."
        )
    has_proj = proj in set(sf.keys())
    proj_dim = sf.shape(proj)[1 if open_clip else 0] if has_proj else hidden
    cfg = CLIPTextConfig(
        vocab_size=emb[0],
        hidden_size=hidden,
        intermediate_size=fc1[0],
        num_hidden_layers=layers,
        num_attention_heads=heads or max(1, hidden // 64),
        max_position_embeddings=pos[0],
        hidden_act="gelu" if open_clip else "quick_gelu",
        projection_dim=proj_dim,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return cfg, has_proj


def infer_unet_config(sf, family: str, prefix: str = LDM_UNET_PREFIX) -> dict:
    """A diffusers UNet2DConditionModel config from LDM key names and shapes."""
    P = prefix
    keys = [k[len(P) :] for k in sf.keys() if k.startswith(P)]
    require(bool(keys), "the checkpoint has no UNet (model.diffusion_model.*) weights.")
    shape = lambda k: sf.shape(P + k)  # noqa: E731
    ks = set(keys)
    in_w = shape("input_blocks.0.0.weight")
    n_in = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("input_blocks."))
    levels, cur = [], []
    for n in range(1, n_in):
        if f"input_blocks.{n}.0.op.weight" in ks:
            levels.append(cur)
            cur = []
        else:
            cur.append(n)
    levels.append(cur)
    lpb = len(levels[0])
    block_out, has_attn, depth = [], [], []
    for lv in levels:
        n = lv[0]
        block_out.append(shape(f"input_blocks.{n}.0.out_layers.3.weight")[0])
        a = f"input_blocks.{n}.1.proj_in.weight" in ks
        has_attn.append(a)
        depth.append(
            1 + max(int(k.split(".")[4]) for k in keys if k.startswith(f"input_blocks.{n}.1.transformer_blocks."))
            if a
            else 1
        )
    kv = {k: tuple(shape(k)) for k in keys if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    require(
        bool(kv),
        "the checkpoint's UNet has no cross-attention (attn2.to_k) weights; it is not a "
        "text-conditioned SD UNet or the file is incomplete.",
    )
    widths = [s[1] if len(s) == 2 else None for s in kv.values()]
    common = max(set(widths), key=widths.count)  # every cross-attention k/v reads one width
    for k, sk in kv.items():
        if len(sk) != 2 or sk[1] != common:
            raise WeightsmithError(
                f"UNet weight {P + k} has shape {sk}, unlike the other cross-attention weights "
                f"(… × {common}); the file is damaged."
            )
    ctx_key = next(k for k in kv if kv[k][1] == common)
    linear = len(shape(next(k for k in keys if k.endswith("proj_in.weight")))) == 2
    mid_attn = "middle_block.1.proj_in.weight" in ks
    defaults = families.get(family).denoiser_defaults  # what the weights do not say
    heads = defaults.get("attention_head_dim") or [max(1, c // 64) for c in block_out]
    cfg = dict(
        sample_size=defaults.get("sample_size", 64),
        in_channels=in_w[1],
        out_channels=shape("out.2.weight")[0],
        block_out_channels=tuple(block_out),
        layers_per_block=lpb,
        cross_attention_dim=shape(ctx_key)[1],
        attention_head_dim=heads,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        mid_block_type="UNetMidBlock2DCrossAttn" if mid_attn else None,
        use_linear_projection=linear,
        norm_num_groups=32 if min(block_out) >= 32 else 8,
    )
    if any(d != 1 for d in depth):
        cfg["transformer_layers_per_block"] = tuple(depth)
    if "label_emb.0.0.weight" in ks:
        adm = shape("label_emb.0.0.weight")[1]
        cfg.update(
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=adm
        )
    cfg.update(metadata_json(sf, "ws_unet_config", _unet_config_problem(cfg)))
    return cfg


def _unet_config_problem(inferred: dict):
    """A check for ``ws_unet_config``: the entries the weights determine must agree with them."""

    def check(val: dict) -> str | None:
        for k in ("in_channels", "out_channels", "cross_attention_dim", "block_out_channels", "layers_per_block"):
            if k in val:
                want = inferred[k]
                got = tuple(val[k]) if isinstance(val[k], list) else val[k]
                if got != want:
                    return f"{k} = {val[k]!r} contradicts the weights ({want!r})"
        return None

    return check


def metadata_json(sf, key: str, check=None) -> dict:
    """The checkpoint metadata entry ``key`` (Weightsmith's own ``ws_*`` entries) parsed as a JSON
    object and checked with ``check(value) -> str | None`` (a problem, or None); a broken or
    contradictory entry is one :class:`WeightsmithError` naming it (docs/reliability.md, "Inputs")."""
    raw = (sf.metadata or {}).get(key)
    if raw is None:
        return {}
    fix = (
        f"The file was edited or damaged: remove the {key} metadata entry (it is re-inferred from the "
        "weights) or export the file again."
    )
    try:
        val = json.loads(raw)
    except (ValueError, TypeError) as e:
        raise WeightsmithError(f"the checkpoint's metadata entry {key} is not valid JSON ({e}). {fix}") from None
    if not isinstance(val, dict):
        raise WeightsmithError(
            f"the checkpoint's metadata entry {key} is a {type(val).__name__}, not a JSON object. {fix}"
        )
    problem = check(val) if check else None
    if problem:
        raise WeightsmithError(f"the checkpoint's metadata entry {key}: {problem}. {fix}")
    return val


def heads_problem(val: dict) -> str | None:
    """A check for ``ws_text_encoder_heads``: every head count a positive integer."""
    for c, h in val.items():
        if not isinstance(h, int) or isinstance(h, bool) or h < 1:
            return f"the head count of {c} is {h!r}, not a positive integer"
    return None
