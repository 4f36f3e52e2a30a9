"""The result of any closed-form edit (erasure or merge), independent of how it was computed.

An :class:`Edit` holds ΔW per canonical module name (see :mod:`weightsmith.core.naming`), and,
where the solver knows one, an exact low-rank factorisation ``up @ down == ΔW`` so the edit can be
written as a LoRA without loss. It never changes the model it was computed from:
:meth:`Edit.apply` returns a copy.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .naming import UNET


@dataclass
class Edit:
    family: str
    unet_config: dict
    deltas: dict[str, torch.Tensor]                                  # canonical module -> ΔW
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (up, down)
    report: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)   # label -> path of every input file (never written to)

    def scaled(self, strength: float) -> "Edit":
        s = float(strength)
        return Edit(self.family, self.unet_config, {k: v * s for k, v in self.deltas.items()},
                    {k: (u * s, d) for k, (u, d) in self.factors.items()}, dict(self.report), dict(self.sources))

    def apply(self, model, strength: float = 1.0):
        """A copy of ``model`` with ``W + strength·ΔW`` (the input model is left untouched)."""
        touches_unet = any(k.startswith(UNET + ".") for k in self.deltas)
        new = model.with_unet(copy.deepcopy(model.unet)) if touches_unet else copy.copy(model)
        new.text_encoders = {c: copy.deepcopy(t) for c, t in model.text_encoders.items()}
        for name, d in self.deltas.items():
            mod = new.module(name)
            with torch.no_grad():
                mod.weight.add_((strength * d).to(mod.weight.dtype).reshape(mod.weight.shape))
        return new
