"""Weights held in half precision, computed in float32 (docs/merge.md, "Memory").

CPUs without bf16/fp16 matrix units multiply half-precision tensors several times slower than
float32 (measured on these 2-core machines: 9.8 vs 66 GFLOP/s), while an SDXL model in float32 does
not fit beside its merge statistics in 16 GB. :func:`hold_weights` stores every Linear/Conv2d
weight in ``dtype`` and makes the layer compute in float32, casting its weight one layer at a time
(what ComfyUI's "manual cast" layers do); norms, embeddings and biases stay float32.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _linear_forward(self, x):
    b = None if self.bias is None else self.bias.float()
    return F.linear(x.float(), self.weight.float(), b)


def _conv_forward(self, x):
    b = None if self.bias is None else self.bias.float()
    return self._conv_forward(x.float(), self.weight.float(), b)


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The precision a layer whose weight is stored in ``weight_dtype`` computes in: float32 for the
    half precisions (:func:`hold_weights`), the weight's own otherwise (float32, float64). Inputs and
    LoRA factors fed to such a layer are kept at this precision, so a model held in half computes
    exactly what a float32 model of the same values computes."""
    return torch.promote_types(weight_dtype, torch.float32)


def hold_weights(module: torch.nn.Module, dtype=torch.bfloat16) -> torch.nn.Module:
    """Store ``module``'s Linear/Conv2d weights in ``dtype`` (in place), computing in float32; every
    other parameter and buffer becomes float32. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.to(dtype)
            m.forward = types.MethodType(_linear_forward, m)
        elif isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.to(dtype)
            m.forward = types.MethodType(_conv_forward, m)
        else:
            for p in m.parameters(recurse=False):
                p.data = p.data.float()
            for k, buf in list(m._buffers.items()):
                if buf is not None and buf.is_floating_point():
                    m._buffers[k] = buf.float()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
            m.bias.data = m.bias.data.float()
    return module
