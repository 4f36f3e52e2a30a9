"""The Flux tests' own name tables (BFL ↔ diffusers, written out here from the public Flux code and
not taken from Weightsmith's ``core/layouts/flux_names.py``, so the tests check that module instead of
repeating it). Imported by tests/test_flux_lora.py and tests/test_flux_merge.py."""

from __future__ import annotations

import torch

D_TAB = {  # BFL double-block layer -> diffusers module(s), in row order
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
}
S_TAB = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
T_TAB = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "final_layer.linear": "proj_out",
}
SWAPPED = "final_layer.adaLN_modulation.1"  # BFL rows (shift, scale); diffusers (scale, shift)


def table(depth: int, single: int) -> dict:
    """BFL name -> the diffusers names of its row blocks, in order, at the given depth."""
    out = {k: [v] for k, v in T_TAB.items()}
    for i in range(depth):
        out.update({f"double_blocks.{i}.{k}": [f"transformer_blocks.{i}.{x}" for x in v] for k, v in D_TAB.items()})
    for i in range(single):
        out.update(
            {f"single_blocks.{i}.{k}": [f"single_transformer_blocks.{i}.{x}" for x in v] for k, v in S_TAB.items()}
        )
    return out


def swap(t):
    """Rows (shift, scale) ↔ (scale, shift)."""
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])
