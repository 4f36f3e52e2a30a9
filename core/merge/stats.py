"""Forward hooks for merging: low-rank deltas on the fly, and streaming Gram statistics.

:class:`DeltaHooks` makes one shared base model behave as "base + LoRA i" or "base + current merge"
without copying or changing a single weight: a forward hook adds ``x·downᵀ·upᵀ`` (a conv pair for
conv modules) to each touched module's output. Switching between delta sets is a pointer change.

:class:`GramStats` accumulates, per module, the Gram matrices of IterIS (docs/method.md,
"Streaming Gram statistics") while features stream through forward hooks, never keeping them:

- ``gram`` mode: ``G += XᵀX`` (iteration 0, where ``X̃ = X``), and the output energy
  ``‖X Wᵀ‖²`` of the running model (= tr(W G Wᵀ), read from the module's output, for λ);
- ``x`` mode: keep the inputs of the *current forward pass only* (one batch) in a queue;
- ``pair`` mode: take the queued ``X`` rows of the same module and accumulate
  ``H += X̃ᵀX̃`` and, for each LoRA factor ``down`` given in :attr:`GramStats.projections`, the
  ``r × d_in`` product ``D += down·XᵀX̃`` directly (as ``(X·downᵀ)ᵀX̃``: the solve needs ``down·C``,
  never ``C = XᵀX̃`` itself); ``C`` is kept only in float32 and only when its Frobenius norm is
  needed for the ridge (``c_norm``). ``X̃ ← (1−ρ)X̃ + ρX`` for ``reg_coef`` ρ. Then the rows are dropped.

Modules reading the same input (q/k/v projections, cross-attention k/v) share one set of
matrices. The state is one float64 ``d_in × d_in`` matrix per input (plus a float32 one for ``‖C‖``),
independent of the number of samples; transient memory is one batch of inputs. Only the modules in
:attr:`GramStats.active` record (the solver's memory plan runs modules in groups over several
passes). Rows are tokens (text encoder, cross-attention
``to_k``/``to_v``), pixels (linear layers and 1×1 convs in the UNet) or unfolded patches for
larger kernels (``d_in = c_in·kh·kw``, matching ``weight.reshape(out, -1)``). Modules with
``d_in > max_dim`` get no statistics (the caller falls back to the weighted sum there).
With ``max_rows`` > 0 each call reads at most that many rows per batch item, a seeded subset scaled
to stand for all of them (:meth:`GramStats._subset`; docs/merge.md, "Speed").
"""

from __future__ import annotations

import math
import re
import zlib
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..precision import compute_dtype
from .sampling import denoiser_stats, is_context_only, stats_of


def module_rows(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The inputs of a Linear/Conv2d as rows of ``X`` (one row per token/pixel/patch)."""
    if isinstance(module, torch.nn.Conv2d):
        k = module.kernel_size
        if k == (1, 1) and module.stride == (1, 1) and module.padding in ((0, 0), 0):
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        cols = F.unfold(x, k, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def in_dim(module: torch.nn.Module) -> int:
    w = module.weight
    return int(w[0].numel())


class DeltaHooks:
    """Named sets of low-rank deltas applied through forward hooks; ``use(key)`` switches sets."""

    def __init__(self, model, names):
        self.model = model
        self.names = list(names)
        self.sets: dict[str, dict] = {}
        self.active: str | None = None
        self._handles = []
        for n in self.names:
            mod = model.module(n)
            self._handles.append(mod.register_forward_hook(self._hook(n)))

    def add(self, key: str, factors: dict, update: bool = False) -> None:
        """``factors``: module -> (up out×R, down R×in·kh·kw), ``up@down`` = ΔW (scale folded in); a
        mapping or an iterable of ``(module, (up, down))`` pairs (converted one at a time). Stored in the
        precision the layer computes in (:func:`..precision.compute_dtype`); a module computing in another dtype
        gets them cast per call. ``update``: replace only these modules' factors in the existing set."""
        prepared = self.sets[key] if update else {}
        for n, (up, down) in factors.items() if hasattr(factors, "items") else factors:
            mod = self.model.module(n)
            w = mod.weight
            dev = w.device if w.device.type != "meta" else torch.device("cpu")  # a streamed block (Flux)
            up = up.to(device=dev, dtype=compute_dtype(w.dtype))
            down = down.to(device=dev, dtype=compute_dtype(w.dtype))
            if isinstance(mod, torch.nn.Conv2d):
                down = down.reshape(down.shape[0], *w.shape[1:])
                up = up.reshape(up.shape[0], up.shape[1], 1, 1)
            prepared[n] = (up.contiguous(), down.contiguous())
        self.sets[key] = prepared

    def use(self, key: str | None) -> None:
        self.active = key

    def _hook(self, name):
        def hook(module, inputs, output):
            if self.active is None:
                return None
            fac = self.sets[self.active].get(name)
            if fac is None:
                return None
            up, down = fac
            x = inputs[0]
            if down.dtype != x.dtype:
                up, down = up.to(x.dtype), down.to(x.dtype)
            if isinstance(module, torch.nn.Conv2d):
                h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation, module.groups)
                return output + F.conv2d(h, up)
            return output + F.linear(F.linear(x, down), up)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# the text encoders' (by kind of encoder; a denoiser's groups are its family's DenoiserStats.shared_inputs)
_SHARED_INPUT = [
    (re.compile(r"^(.*\.self_attn)\.(q|k|v)_proj$"), r"\1.qkv"),  # CLIP attention
    (re.compile(r"^(.*\.layer\.0\.SelfAttention)\.(q|k|v)$"), r"\1.qkv"),  # T5 self-attention
    (re.compile(r"^(.*\.layer\.1\.DenseReluDense)\.wi_(0|1)$"), r"\1.wi"),  # T5's gated MLP input
]


def input_group(name: str, denoiser=None) -> str:
    """Modules that read the very same input tensor share one set of Gram matrices (``denoiser``: the model
    family's ``DenoiserStats``; None: :func:`.sampling.denoiser_stats` finds it)."""
    st = denoiser_stats(name, denoiser)
    for pat, rep in _SHARED_INPUT if st is None else st.shared_inputs:
        if pat.match(name):
            return pat.sub(rep, name)
    return name


class GramStats:
    """Streaming ``G``, ``C``, ``H`` per module (see module docstring). Call :meth:`reset` between LoRAs."""

    def __init__(
        self,
        model,
        names,
        *,
        dtype=torch.float64,
        device="cpu",
        max_dim: int = 6144,
        reg_coef: float = 0.0,
        max_rows: int = 0,
        seed: int = 0,
    ):
        self.model = model
        self.denoiser = stats_of(model)  # how the model's family names its denoiser's modules
        self.max_rows = int(max_rows or 0)  # > 0: at most this many rows per batch item (see _subset)
        self.seed = int(seed)
        self._calls: dict = defaultdict(int)
        self.dtype = dtype
        self.device = torch.device(device)
        self.reg_coef = float(reg_coef)
        self.mode = "off"
        self.dims: dict[str, int] = {}
        self.tracked: list[str] = []
        self.skipped: list[str] = []
        self._handles = []
        self._queue: dict[str, list] = defaultdict(list)
        self.acc: dict[str, dict[str, torch.Tensor]] = {}
        self.rows: dict[str, int] = defaultdict(int)
        self.energy: dict[str, float] = {}
        self.peak_queue_bytes = 0
        self._queue_bytes = 0
        self.item_weights: torch.Tensor | None = None  # per batch item (rows are weighted by them)
        self.context_enabled = True  # False: ignore cross-attention k/v calls
        self.leader: dict[str, str] = {}
        self.active: set | None = None  # None: every tracked module records
        self.projections: dict[str, list] = {}  # leader -> [(module, down (r × d_in) float64)]
        self.c_norm = False  # pair mode: keep C (float32) for ‖C‖_F
        for n in names:
            mod = model.module(n)
            d = in_dim(mod)
            self.dims[n] = d
            if d > max_dim:
                self.skipped.append(n)
                continue
            self.tracked.append(n)
            self.leader.setdefault(input_group(n, self.denoiser), n)
            self._handles.append(mod.register_forward_hook(self._hook(n)))
        self.leader_of = {n: self.leader[input_group(n, self.denoiser)] for n in self.tracked}
        self.context_names = {n for n in self.tracked if is_context_only(n, self.denoiser)}

    # -- accumulation ---------------------------------------------------------------------------
    def _hook(self, name):
        def hook(module, inputs, output):
            if self.mode == "off" or (not self.context_enabled and name in self.context_names):
                return
            if self.active is not None and name not in self.active:
                return
            if self.mode == "gram":  # ‖X Wᵀ‖² of the running model (for λ), from the output it computed
                y = (
                    output
                    if module.bias is None
                    else output
                    - (
                        module.bias.reshape(1, -1, 1, 1)
                        if output.dim() == 4 and isinstance(module, torch.nn.Conv2d)
                        else module.bias
                    )
                )
                e = y.double().pow(2)
                if self.item_weights is not None:
                    e = e.reshape(len(self.item_weights), -1).sum(1) @ self.item_weights.to(e.device)
                self.energy[name] = self.energy.get(name, 0.0) + float(e.sum())
            if self.leader_of[name] == name:
                self.feed(name, module_rows(module, inputs[0]), items=inputs[0].shape[0])

        return hook

    def _subset(self, name: str, rows: torch.Tensor, items: int) -> torch.Tensor:
        """At most ``max_rows`` rows per batch item, scaled by √(per item / kept) so that the Gram
        matrices stand for all of them (docs/merge.md, "Speed"). The positions are seeded by (seed,
        module, call number since :meth:`reset`), the same in every item of a batch and in every pass, so
        paired passes and later iterations read the same positions."""
        per = rows.shape[0] // max(1, items)
        k = self.max_rows
        if k <= 0 or per <= k or per * items != rows.shape[0]:
            return rows
        mode_key = (self.mode, name)
        call = self._calls[mode_key]
        self._calls[mode_key] = call + 1
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + call) % (2**63))
        idx = torch.randperm(per, generator=g)[:k].sort().values
        sel = (torch.arange(items)[:, None] * per + idx[None, :]).reshape(-1).to(rows.device)
        return rows.index_select(0, sel) * math.sqrt(per / k)

    def _add(self, name, key, a, b, dtype=None):
        acc = self.acc.setdefault(name, {})
        if key not in acc:
            acc[key] = torch.zeros(a.shape[1], b.shape[1], dtype=dtype or self.dtype, device=self.device)
        acc[key].addmm_(a.t(), b)

    def set_active(self, names=None) -> None:
        """Record only ``names`` (None: every tracked module). Whole input groups go together."""
        self.active = None if names is None else set(names)

    def feed(self, name: str, rows: torch.Tensor, items: int | None = None) -> None:
        """Give rows of module ``name``'s input to the accumulator (its forward hook calls this;
        ``items``: the batch size the rows come from, for ``max_rows``)."""
        if self.leader_of.get(name) != name:
            return  # untracked, or shares its input with a module that already fed these rows
        mode = self.mode
        if self.max_rows and items:
            rows = self._subset(name, rows, items)
        if mode == "gram":
            x = rows.to(device=self.device, dtype=self.dtype)
            self._add(name, "G", self._weighted(x), x)
            self.rows[name] += x.shape[0]
        elif mode == "x":
            r = rows.detach()
            self._queue[name].append(r)
            self._queue_bytes += r.numel() * r.element_size()
            self.peak_queue_bytes = max(self.peak_queue_bytes, self._queue_bytes)
        elif mode == "pair":
            if not self._queue[name]:
                raise RuntimeError(f"unpaired features for {name}: the merged pass saw a call the LoRA pass did not")
            xr = self._queue[name].pop(0)
            self._queue_bytes -= xr.numel() * xr.element_size()
            if xr.shape != rows.shape:
                raise RuntimeError(f"paired passes disagree at {name}: {tuple(xr.shape)} vs {tuple(rows.shape)}")
            x = xr.to(device=self.device, dtype=self.dtype)
            xt = rows.to(device=self.device, dtype=self.dtype)
            if self.reg_coef:
                xt = (1.0 - self.reg_coef) * xt + self.reg_coef * x
            xw = self._weighted(x)
            for n, down in self.projections.get(name, ()):  # D_n += down·XᵀX̃ = (X·downᵀ)ᵀX̃
                self._add(name, ("D", n), xw @ down.t(), xt)
            if self.c_norm:
                self._add(name, "C32", xw.float(), xt.float(), dtype=torch.float32)
            self._add(name, "H", self._weighted(xt), xt)
            self.rows[name] += x.shape[0]

    def _weighted(self, x: torch.Tensor) -> torch.Tensor:
        """Rows times their item's weight (the text stage counts each distinct prompt once)."""
        w = self.item_weights
        if w is None:
            return x
        per = x.shape[0] // len(w)
        return x * w.to(x.device, x.dtype).repeat_interleave(per)[:, None]

    def acc_for(self, name: str) -> dict | None:
        """The statistics of module ``name`` (shared by modules reading the same input)."""
        lead = self.leader_of.get(name)
        return self.acc.get(lead) if lead else None

    def check_paired(self) -> None:
        left = [n for n, q in self._queue.items() if q]
        if left:
            raise RuntimeError(f"{len(left)} modules have LoRA-pass features without a merged pass (e.g. {left[0]})")

    def reset(self) -> None:
        self.acc = {}
        self.energy = {}
        self.rows = defaultdict(int)
        self._queue = defaultdict(list)
        self._queue_bytes = 0
        self._calls = defaultdict(int)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
