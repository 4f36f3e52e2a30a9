"""The report picture (drawn by core.report.picture) in ComfyUI's IMAGE layout."""

from __future__ import annotations


def to_comfy_image(img):
    """PIL image -> float tensor [1, H, W, 3] in 0..1."""
    import numpy as np
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).unsqueeze(0)
