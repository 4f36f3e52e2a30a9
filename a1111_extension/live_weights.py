"""Reversible in-place edits of a host's loaded weights (A1111 and the standalone app).

A host keeps one copy of the model, so "Apply" has to change its tensors in place. Two rules make
that safe (docs/method.md, "A1111"):

- **Edit the restored weights, not the LoRA-patched ones.** A1111's Lora extension keeps CPU
  backups of every layer it patched (``network_weights_backup``; a tuple ``(in_proj_weight,
  out_proj.weight)`` for ``nn.MultiheadAttention``) and restores them whenever the active LoRA set
  changes. We add ΔW to the *backup* (the base weight) and write ``base + ΔW`` into the live
  tensor, then mark the layer stale (``network_current_names = ()``) so the extension re-applies
  the active LoRAs on top at the next forward. The edit is then neither lost when the LoRA set
  changes (the backup holds it) nor applied twice (the LoRAs are added once, to the new base).
- **Keep our own exact copy of every tensor we change.** Undo writes those copies back into the
  backup and the live tensor, bit for bit, however often the LoRA set changed in between.

A :class:`Slot` says where a canonical weight lives in the host: a module, the parameter name and,
for OpenCLIP's fused ``in_proj_weight``, the row range of q, k or v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import WeightsmithError


@dataclass(frozen=True)
class Slot:
    module: torch.nn.Module
    param: str  # "weight" or "in_proj_weight"
    rows: tuple[int, int] | None = None  # row range inside a fused tensor

    @property
    def key(self) -> tuple[int, str]:
        return (id(self.module), self.param)


def _is_mha(module) -> bool:
    return isinstance(module, torch.nn.MultiheadAttention)


def lora_backup(module, param: str):
    """The Lora extension's backup of ``module.param`` (the weight without LoRAs), or None."""
    wb = getattr(module, "network_weights_backup", None)
    if wb is None:
        return None
    if _is_mha(module):
        return wb[0] if param == "in_proj_weight" else None
    return wb if param == "weight" else None


def base_tensor(module, param: str) -> torch.Tensor:
    """The weight as the checkpoint has it: the Lora backup when there is one, else the live one."""
    b = lora_backup(module, param)
    return b if b is not None else getattr(module, param)


def _fingerprint(t: torch.Tensor) -> tuple:
    t = t.detach().float().cpu()
    return (tuple(t.shape), float(t.double().sum()), float(t.double().abs().sum()))


class LiveEditor:
    """Applies edits to host tensors in place and undoes them exactly."""

    def __init__(self):
        self._orig: dict[tuple, tuple[Slot, torch.Tensor]] = {}  # key -> (slot, original base copy)
        self._written: dict[tuple, tuple] = {}  # key -> fingerprint of what we wrote

    @property
    def applied(self) -> bool:
        return bool(self._orig)

    def modules(self):
        return [s.module for s, _ in self._orig.values()]

    # ------------------------------------------------------------------------------------------
    def apply(self, deltas: dict[str, torch.Tensor], slots: dict[str, Slot], strength: float = 1.0) -> int:
        """Add ``strength * ΔW`` to the base weight of every slot. Returns the number of tensors."""
        missing = [n for n in deltas if n not in slots]
        if missing:
            raise WeightsmithError(
                f"the loaded model has no layer for {len(missing)} edited weight(s) (first: {missing[0]}); "
                "the edit was computed for another model. Nothing was changed."
            )
        plan = []
        for name, d in deltas.items():
            s = slots[name]
            base = base_tensor(s.module, s.param)
            view = base[s.rows[0] : s.rows[1]] if s.rows else base
            if view.numel() != d.numel():
                raise WeightsmithError(
                    f"{name}: the edit has {tuple(d.shape)} but the loaded weight has {tuple(view.shape)}; "
                    "the edit was computed for another model. Nothing was changed."
                )
            plan.append((s, d))
        touched = set()
        with torch.no_grad():
            for s, d in plan:
                if s.key not in self._orig:
                    self._orig[s.key] = (s, base_tensor(s.module, s.param).detach().to("cpu", copy=True))
                base = base_tensor(s.module, s.param)
                view = base[s.rows[0] : s.rows[1]] if s.rows else base
                new = view.float() + strength * d.to(view.device, torch.float32).reshape(view.shape)
                view.copy_(new.to(view.dtype))
                touched.add(s.key)
                self._sync_live(s)
        for key in touched:
            s = self._orig[key][0]
            self._written[key] = _fingerprint(base_tensor(s.module, s.param))
        return len(plan)

    def _sync_live(self, s: Slot) -> None:
        """Make the live tensor equal the (edited) base and let the Lora extension re-apply LoRAs."""
        backup = lora_backup(s.module, s.param)
        if backup is None:
            return  # the base *is* the live tensor
        live = getattr(s.module, s.param)
        live.copy_(backup.to(live.device, live.dtype))
        s.module.network_current_names = ()

    def check_unchanged(self) -> None:
        """Raise if the host replaced the weights we edited (model reloaded or switched)."""
        for key, (s, _) in self._orig.items():
            if _fingerprint(base_tensor(s.module, s.param)) != self._written.get(key):
                raise WeightsmithError(
                    "the model's weights were replaced since Apply (the checkpoint was reloaded or "
                    "switched), so the edit is no longer in memory and there is nothing to undo."
                )

    def undo(self, force: bool = False) -> int:
        """Write the exact original tensors back. Returns the number of tensors restored."""
        if not self._orig:
            return 0
        if not force:
            try:
                self.check_unchanged()
            except WeightsmithError:
                self.forget()
                raise
        with torch.no_grad():
            for s, orig in self._orig.values():
                base = base_tensor(s.module, s.param)
                base.copy_(orig.to(base.device))
                self._sync_live(s)
        n = len(self._orig)
        self.forget()
        return n

    def forget(self) -> None:
        self._orig.clear()
        self._written.clear()
