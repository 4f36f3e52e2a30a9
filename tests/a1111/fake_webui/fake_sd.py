"""sd_model objects with A1111 v1.10's module layout, built from a tiny model's LDM state dict."""

import torch
from torch import nn


class HF430(nn.Module):
    """transformers 4.30's CLIPTextModel layout (A1111's pin): a ``text_model`` child.
    Under transformers 5.x the module tree has no ``text_model`` level; this restores it."""

    def __init__(self, hf):
        super().__init__()
        inner = getattr(hf, "text_model", hf)
        self.text_model = inner
        self.config = hf.config


def _child(root, path):
    mod = root
    for part in path.split(".") if path else []:
        if not hasattr(mod, part) or getattr(mod, part) is None:
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    return mod


def tree_from_state(sd: dict, prefix: str, heads: int | None = None, dtype=torch.float32) -> nn.Module:
    """Modules named like the keys: Linear (2-D), Conv2d (4-D), LayerNorm (1-D weight),
    Embedding (``token_embedding``), nn.MultiheadAttention where ``in_proj_weight`` appears."""
    root = nn.Module()
    owners = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            mod, _, p = k[len(prefix) :].rpartition(".")
            owners.setdefault(mod, {})[p] = v
    for mpath in sorted(owners, key=lambda s: (s.count("."), s)):
        ps = owners[mpath]
        parent_path, _, name = mpath.rpartition(".")
        try:
            existing = root.get_submodule(mpath) if mpath else root
        except AttributeError:
            existing = None
        if existing is not None and mpath:
            mod = existing  # e.g. attn.out_proj inside an MHA
        elif "in_proj_weight" in ps:
            e = ps["in_proj_weight"].shape[1]
            mod = nn.MultiheadAttention(e, heads)
        elif mpath == "" or "weight" not in ps:
            mod = _child(root, mpath)
        else:
            w = ps["weight"]
            if name == "token_embedding":
                mod = nn.Embedding(w.shape[0], w.shape[1])
            elif w.dim() == 2:
                mod = nn.Linear(w.shape[1], w.shape[0], bias="bias" in ps)
            elif w.dim() == 4:
                mod = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias="bias" in ps)
            else:
                mod = nn.LayerNorm(w.shape[0])
        if mpath and existing is None:
            _child(root, parent_path).add_module(name, mod)
        for p, v in ps.items():
            if hasattr(mod, p) and isinstance(getattr(mod, p), torch.Tensor):
                getattr(mod, p).data = v.detach().clone().to(dtype)
            else:
                mod.register_parameter(p, nn.Parameter(v.detach().clone().to(dtype), requires_grad=False))
    root.requires_grad_(False)
    return root


class Wrapped(nn.Module):
    """sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords & co.: the original under ``.wrapped``."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped


class ModelSlot(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        for k, v in kw.items():
            if isinstance(v, nn.Module):
                self.add_module(k, v)
            else:
                setattr(self, k, v)


class CheckpointInfo:
    def __init__(self, filename):
        import os

        self.filename = filename
        self.title = os.path.basename(filename)


def build_sd_model(family, ldm_sd, hf_encoders, heads, filename, unet_dtype=torch.float32):
    """family sd1/sd2/sdxl; hf_encoders: {component: transformers CLIP model} (deep-copied);
    heads: {component: attention heads} for the OpenCLIP trees."""
    import copy

    sm = ModelSlot()
    sm.is_sdxl, sm.is_sd2, sm.is_sd1, sm.is_sd3 = family == "sdxl", family == "sd2", family == "sd1", False
    sm.add_module(
        "model", ModelSlot(diffusion_model=tree_from_state(ldm_sd, "model.diffusion_model.", dtype=unet_dtype))
    )
    if family == "sd1":
        te = hf_encoders["text_encoder"]
        inner = ModelSlot(transformer=HF430(copy.deepcopy(te)), tokenizer=hf_encoders["tokenizer"])
        sm.add_module("cond_stage_model", Wrapped(inner))
    elif family == "sd2":
        oc = tree_from_state(ldm_sd, "cond_stage_model.model.", heads["text_encoder"])
        sm.add_module("cond_stage_model", Wrapped(ModelSlot(model=oc)))
    else:
        e0 = Wrapped(
            ModelSlot(transformer=HF430(copy.deepcopy(hf_encoders["text_encoder"])), tokenizer=hf_encoders["tokenizer"])
        )
        e1 = Wrapped(
            ModelSlot(model=tree_from_state(ldm_sd, "conditioner.embedders.1.model.", heads["text_encoder_2"]))
        )
        timestep = ModelSlot()  # ConcatTimestepEmbedderND: not a text embedder
        sm.add_module("conditioner", ModelSlot(embedders=nn.ModuleList([e0, e1, timestep])))
        sm.cond_stage_model = None
    sm.sd_checkpoint_info = CheckpointInfo(str(filename))
    sm.requires_grad_(False)
    sm.fake_tokenizer = hf_encoders.get("tokenizer")  # the stand-in's own, for encode() only
    from modules import sd_hijack

    sd_hijack.hijack(sm)  # token embeddings → EmbeddingsWithFixes
    return sm


# ---- text conditioning (what prompt_parser.get_learned_conditioning ends up calling) ---------------
def _ids(tok, prompts, length):
    return tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def _hf_encode(inner, tok, prompts):
    te = inner.transformer.text_model  # the transformers CLIPTextModel
    ids = _ids(tok, prompts, te.config.max_position_embeddings)
    return te(input_ids=ids).last_hidden_state


def _openclip_encode(oc, tok, prompts):
    """open_clip's text transformer (ldm FrozenOpenCLIPEmbedder.encode_with_transformer): token
    embedding + positions, pre-LN residual blocks with causal nn.MultiheadAttention, final LN."""
    n = oc.positional_embedding.shape[0]
    x = oc.token_embedding(_ids(tok, prompts, n)) + oc.positional_embedding
    mask = torch.full((n, n), float("-inf")).triu_(1)
    x = x.permute(1, 0, 2)
    for _, blk in sorted(oc.transformer.resblocks.named_children(), key=lambda t: int(t[0])):
        h = blk.ln_1(x)
        x = x + blk.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + blk.mlp.c_proj(torch.nn.functional.gelu(blk.mlp.c_fc(blk.ln_2(x))))
    return oc.ln_final(x.permute(1, 0, 2))


def encode(sd_model, prompts):
    """The conditioning for ``prompts`` computed with the live weights, through the wrapped
    embeddings (SDXL: both embedders' outputs side by side)."""
    tok = sd_model.fake_tokenizer
    with torch.no_grad():
        if getattr(sd_model, "is_sdxl", False):
            outs = []
            for e in sd_model.conditioner.embedders:
                inner = getattr(e, "wrapped", None)
                if inner is not None and hasattr(inner, "transformer"):
                    outs.append(_hf_encode(inner, tok, prompts).float())
                elif inner is not None:
                    outs.append(_openclip_encode(inner.model, tok, prompts).float())
            n = min(o.shape[1] for o in outs)
            return torch.cat([o[:, :n] for o in outs], -1)
        inner = sd_model.cond_stage_model.wrapped
        if hasattr(inner, "transformer"):
            return _hf_encode(inner, tok, prompts).float()
        return _openclip_encode(inner.model, tok, prompts).float()
