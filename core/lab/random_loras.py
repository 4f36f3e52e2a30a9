"""Seeded random kohya LoRAs for tests and the benchmark (never for users' models)."""

from __future__ import annotations

import json
import re

import torch

from ..naming import kohya_prefix, te_path

# which modules each target group touches (canonical-name patterns)
TARGETS = {
    "attn": re.compile(r"^unet\..*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    "ff": re.compile(r"^unet\..*\.ff\.net\.(0\.proj|2)$"),
    "te": re.compile(
        r"^text_encoder(_2)?\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"
    ),
    "proj": re.compile(r"^unet\..*\.attentions\.\d+\.proj_(in|out)$"),
    "conv": re.compile(r"^unet\..*resnets\.\d+\.(conv1|conv2|conv_shortcut)$"),
    "kv": re.compile(r"^unet\..*\.attn2\.(to_k|to_v)$"),
}


def target_modules(model, groups=("attn", "ff", "te")) -> list[str]:
    names = []
    for c, te in model.text_encoders.items():
        for n, m in te.named_modules():
            if isinstance(m, torch.nn.Linear):
                p = te_path(n)
                names.append(f"{c}.{p}")
    if any(g not in ("te",) for g in groups):
        for n, m in model.unet.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                names.append(f"unet.{n}")
    return sorted(n for n in names if any(TARGETS[g].match(n) for g in groups))


def random_lora(
    model,
    groups=("attn", "ff", "te"),
    rank: int = 8,
    seed: int = 0,
    strength: float = 0.2,
    alpha: float | None = None,
    tags: dict | None = None,
    modules=None,
):
    """(kohya tensors, metadata): per module ``‖ΔW‖_F ≈ strength·‖W‖_F``. ``alpha`` default ``rank/2``."""
    g = torch.Generator().manual_seed(int(seed))
    alpha = float(rank) / 2 if alpha is None else float(alpha)
    layout = model.layout
    out = {}
    for n in modules if modules is not None else target_modules(model, groups):
        w = model.weight(n)
        shape = tuple(w.shape)
        d_in = int(w[0].numel())
        r = min(rank, shape[0], d_in)
        up = torch.randn(shape[0], r, generator=g, dtype=torch.float64)
        down = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        delta = (alpha / r) * up @ down
        c = strength * float(w.double().norm()) / max(float(delta.norm()), 1e-12)
        up = up * c**0.5
        down = down * c**0.5
        prefix = kohya_prefix(n, model.family, layout)
        if len(shape) == 4:
            out[prefix + ".lora_up.weight"] = up.float().reshape(shape[0], r, 1, 1)
            out[prefix + ".lora_down.weight"] = down.float().reshape(r, *shape[1:])
        else:
            out[prefix + ".lora_up.weight"] = up.float()
            out[prefix + ".lora_down.weight"] = down.float()
        out[prefix + ".alpha"] = torch.tensor(alpha)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_tag_frequency": json.dumps({"1_data": tags or {"cat": 10, "photo": 6, "red": 3}}),
    }
    return out, meta
