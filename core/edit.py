"""The result of any closed-form edit (erasure or merge), independent of how it was computed.

An :class:`Edit` holds ΔW per canonical module name (see :mod:`weightsmith.core.naming`), and,
where the solver knows one, an exact low-rank factorisation ``up @ down == ΔW`` so the edit can be
written as a LoRA without loss. It never changes the model it was computed from:
:meth:`Edit.apply` returns a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .naming import UNET


class FactorDeltas(Mapping):
    """ΔW = ``up @ down`` per module, formed when read, one at a time: an exact low-rank edit (an IterIS
    merge of full-coverage SDXL LoRAs: about 10 GB of dense float32 ΔW) never holds every dense ΔW."""

    def __init__(self, factors: dict, shapes: dict):
        self.factors, self.shapes = factors, shapes

    def __getitem__(self, name):
        up, down = self.factors[name]
        return (up @ down).reshape(self.shapes[name])

    def __contains__(self, name):  # Mapping's default would form ΔW to answer
        return name in self.factors

    def __iter__(self):
        return iter(self.factors)

    def __len__(self):
        return len(self.factors)


class LazyFactors(Mapping):
    """name -> exact ``(up, down)`` computed when first read by ``compute(name)`` and kept (factors are
    LoRA-sized): a merge whose factors need a dense step per module (SVD) holds one dense ΔW at a time."""

    def __init__(self, names, compute):
        self.names, self.compute, self.done = list(names), compute, {}
        self._known = set(self.names)

    def __getitem__(self, name):
        if name not in self.done:
            if name not in self._known:
                raise KeyError(name)
            self.done[name] = self.compute(name)
            if len(self.done) == len(self.names):
                self.compute = None  # every module done: let go of the inputs it read
        return self.done[name]

    def __contains__(self, name):
        return name in self._known

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def delta_shape(edit, name: str) -> tuple:
    """The shape of one module's ΔW, without forming a lazily held one."""
    shapes = getattr(edit.deltas, "shapes", None)
    return tuple(shapes[name]) if shapes is not None else tuple(edit.deltas[name].shape)


def delta_is_finite(edit, name: str) -> bool:
    """Whether one module's ΔW holds no NaN/Inf; read from its exact factors where the edit is held as
    factors (its dense ΔW is not formed), else from ΔW itself."""
    from .factor import product_is_finite

    if isinstance(edit.deltas, FactorDeltas):
        up, down = edit.factors[name]
        return product_is_finite(up, down)
    return bool(torch.isfinite(edit.deltas[name]).all())


@dataclass
class Edit:
    family: str
    unet_config: dict
    deltas: dict[str, torch.Tensor]  # canonical module -> ΔW
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (up, down)
    report: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # label -> path of every input file (never written to)

    def scaled(self, strength: float) -> Edit:
        s = float(strength)
        factors = {k: (u * s, d) for k, (u, d) in self.factors.items()}
        deltas = (
            FactorDeltas(factors, self.deltas.shapes)
            if isinstance(self.deltas, FactorDeltas)
            else {k: v * s for k, v in self.deltas.items()}
        )
        return Edit(self.family, self.unet_config, deltas, factors, dict(self.report), dict(self.sources))

    def then(self, other: Edit) -> Edit:
        """A new edit: this one followed by ``other`` (neither is changed). ΔW add per module; where
        both carry exact factors for a module they concatenate (``[u₁ u₂] @ [d₁; d₂] = ΔW₁ + ΔW₂``),
        where only one of two summed modules has factors the sum has none. Family, UNet config and
        report come from ``other``; the report's ``combined_with`` lists the earlier methods, most
        recent first; sources are the union. The tab's Apply stacks edits this way (docs/method.md, "Host
        glue in core")."""
        deltas = dict(self.deltas)
        factors = dict(self.factors)
        for k, d in other.deltas.items():
            if k in deltas:
                deltas[k] = deltas[k] + d
                fa, fb = self.factors.get(k), other.factors.get(k)
                if fa is not None and fb is not None:
                    factors[k] = (torch.cat([fa[0], fb[0]], 1), torch.cat([fa[1], fb[1]], 0))
                else:
                    factors.pop(k, None)
            else:
                deltas[k] = d
                if k in other.factors:
                    factors[k] = other.factors[k]
        report = dict(other.report)
        report["combined_with"] = [self.report.get("method", "?")] + list(self.report.get("combined_with", []))
        return Edit(other.family, other.unet_config, deltas, factors, report, {**self.sources, **other.sources})

    def to(self, device=None, dtype: torch.dtype | None = None) -> Edit:
        """A new edit with every tensor detached and moved to ``device`` / cast to ``dtype`` (None: kept);
        this edit is unchanged. Exact-factor deltas (:class:`FactorDeltas`) stay formed when read.
        A host that keeps an edit past the solve (ComfyUI's WEIGHTSMITH_EDIT) holds ``edit.to("cpu",
        torch.float32)``."""

        def mv(t):
            return t.detach().to(device=device, dtype=dtype)

        factors = {k: (mv(u), mv(d)) for k, (u, d) in self.factors.items()}
        deltas = (
            FactorDeltas(factors, dict(self.deltas.shapes))
            if isinstance(self.deltas, FactorDeltas)
            else {k: mv(v) for k, v in self.deltas.items()}
        )
        return Edit(self.family, dict(self.unet_config), deltas, factors, dict(self.report), dict(self.sources))

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


def patcher_patches(edit: Edit, shapes: dict | None = None) -> tuple[dict, dict]:
    """An edit as ComfyUI-style model-patcher patches (ComfyUI and Forge both take these):
    ``(unet patches, text-encoder patches)``, each ``{state-dict key: ("diff", (ΔW,))}`` in the
    host's key space (:func:`~weightsmith.core.naming.comfy_key`). ``shapes`` (key → parameter
    shape, optional): reshape each ΔW to its parameter's shape (Forge skips a mismatched "diff"
    with a printed warning only); a key missing from ``shapes`` or of another size is a clear error."""
    from . import families
    from .errors import WeightsmithError

    ckpt = families.get(edit.family).checkpoint  # the family's ComfyUI keys
    layout = families.get(edit.family).denoiser_layout(edit.unet_config)
    unet, te = {}, {}
    for name in sorted(edit.deltas):
        key = ckpt.comfy_key(name + ".weight", layout)
        d = edit.deltas[name].detach().float().cpu()
        if shapes is not None:
            shape = shapes.get(key)
            if shape is None or d.numel() != torch.Size(shape).numel():
                raise WeightsmithError(
                    f"the edit changes {key}, which the loaded model "
                    f"{'does not have' if shape is None else f'holds as {tuple(shape)}, not {tuple(d.shape)}'}: "
                    "it was computed for another model. Nothing was changed; compute it again on this one."
                )
            d = d.reshape(shape)
        (unet if key.startswith(ckpt.comfy_denoiser_prefix) else te)[key] = ("diff", (d.contiguous(),))
    return unet, te


def check_patches_accepted(
    wanted, accepted, host: str, part: str, fix: str = "apply it to the model it was computed from"
) -> None:
    """The one check after a host's patcher took an edit's patches (ComfyUI's and Forge's ``add_patches``
    return the keys they accepted and silently skip the rest): every key of ``wanted`` must be among
    ``accepted``, or a :class:`~weightsmith.core.errors.WeightsmithError` says how many of how many
    ``part`` weights ``host`` refused, names the first, and how to fix it (docs/method.md, "Host glue in
    core")."""
    from .errors import WeightsmithError

    got = set(accepted)
    refused = sorted(k for k in wanted if k not in got)
    if refused:
        raise WeightsmithError(
            f"{host} did not accept {len(refused)} of {len(wanted)} {part} weights (first: {refused[0]}): "
            f"the edit was computed for another model. Nothing was changed; {fix}."
        )
