"""Reading LoRA files of every common layout and mapping them onto a loaded base model.

Understood key layouts (docs/method.md, "LoRA files"), mixed freely within one file:

- **kohya**: ``lora_unet_<path>`` (SD1/SD2 diffusers paths, SDXL LDM paths; both are accepted for
  every family), ``lora_te_…`` (SD1/SD2), ``lora_te1_…`` / ``lora_te2_…`` (SDXL), with
  ``.lora_down.weight``, ``.lora_up.weight``, optional ``.alpha`` (scale ``alpha / rank``, missing
  alpha → scale 1) and LoCon's ``.lora_mid.weight`` (CP/Tucker core of a conv LoRA, folded into
  the down factor: ``down'[a,i,h,w] = Σ_b mid[a,b,h,w] down[b,i]``).
- **diffusers / PEFT**: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (also ``lora.down``/
  ``lora.up``, the old attention-processor ``processor.to_q_lora.down`` names and the
  ``base_model.model.`` prefix), ``text_encoder.…`` / ``text_encoder_2.…``.
- **ComfyUI internal keys**: ``diffusion_model.<ldm path>.lora_down.weight`` …,
  ``[text_encoders.]clip_l.transformer.…``, ``clip_h.``, ``clip_g.``.
- **full deltas**: ``<prefix>.diff`` (any of the prefixes above).
- **LyCORIS LoHa / LoKr** (without Tucker cores): expanded to their full delta
  (LoHa ``(w1a·w1b) ⊙ (w2a·w2b)``, LoKr ``w1 ⊗ w2``) with scale ``alpha / rank``.
  OFT/BOFT, DoRA, GLoRA, Tucker-core LoHa/LoKr and bias deltas are refused with a message.

Every module, whatever its format, is held as exact 2-D factors ``ΔW = scale · up @ down``
(``up``: out × r, ``down``: r × in·kh·kw); full deltas are factorised by an SVD at their numerical
rank (float64, exact to rounding). Nothing of the base model is modified.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import families
from .errors import WeightsmithError
from .layouts import flux_lora
from .naming import UNET, te_path
from .safe_io import PICKLE_SUFFIXES, load_plain_pickle

# suffix -> role. Order matters: longest first.
_SUFFIXES = [
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
    (".diff", "diff"),
    (".diff_b", "diff_b"),
    (".set_weight", "set_weight"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_t2", "lokr_t2"),
    (".oft_blocks", "oft"),
    (".oft_diag", "oft"),
    (".oft_R.weight", "oft"),
    (".dora_scale", "dora"),
    (".a1.weight", "glora"),
    (".b1.weight", "glora"),
    (".w_norm", "norm"),
    (".b_norm", "norm"),
    (".on_input", "ignore"),
    (".bias_indices", "ignore"),
]
_SUFFIXES.sort(key=lambda s: -len(s[0]))
_OLD_PROC = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
_REFUSED = {
    "oft": "OFT/BOFT (orthogonal fine-tuning) modules multiply the weight instead of adding to it",
    "dora": "DoRA modules re-normalise the weight instead of adding a delta",
    "glora": "GLoRA modules are not additive deltas",
    "norm": "norm-layer deltas (w_norm/b_norm) are not supported",
    "set_weight": "'set_weight' keys replace weights instead of adding to them",
    "hada_t1": "LoHa with Tucker cores (hada_t1/hada_t2) is not supported",
    "hada_t2": "LoHa with Tucker cores (hada_t1/hada_t2) is not supported",
    "lokr_t2": "LoKr with a Tucker core (lokr_t2) is not supported",
}


@dataclass
class LoRAModule:
    """One module of a LoRA: ``ΔW = scale · up @ down`` reshaped to the module's weight shape."""

    name: str  # canonical module name (see naming.py)
    up: torch.Tensor  # out × r, float32
    down: torch.Tensor  # r × (in·kh·kw), float32
    scale: float  # alpha / r (1 for full deltas)
    shape: tuple  # shape of the base weight
    kind: str = "lora"  # "lora" | "locon" | "full" | "loha" | "lokr"
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        d = self.scale * (self.up.to(torch.float64) @ self.down.to(torch.float64))
        return d.reshape(self.shape).to(dtype)


@dataclass
class LoRA:
    """A LoRA file mapped onto a base model."""

    path: Path | None
    name: str
    modules: dict[str, LoRAModule]
    metadata: dict = field(default_factory=dict)
    formats: tuple = ()
    unmatched: list[str] = field(default_factory=list)  # keys naming no module of the model
    ignored: list[str] = field(default_factory=list)  # keys understood but not used (bias deltas)
    raw: dict | None = field(default=None, repr=False)  # tensors of a file read without a model
    notes: list[str] = field(default_factory=list)  # how the file was read where it is ambiguous
    family: str | None = None  # set where the file itself says (a Flux LoRA, read without a model)

    def bind(self, model) -> LoRA:
        """This LoRA mapped onto ``model`` (itself when it already is)."""
        if self.family == flux_lora.FAMILY:
            _check_flux_fit(self, model)
            return self
        if self.raw is None:
            return self
        return lora_from_state_dict(self.raw, model, metadata=self.metadata, name=self.name, path=self.path)

    def deltas(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        return {k: m.delta(dtype) for k, m in self.modules.items()}

    @property
    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    def tag_frequency(self) -> dict[str, int]:
        """Training caption tags and counts from kohya's ``ss_tag_frequency`` (summed over datasets)."""
        raw = self.metadata.get("ss_tag_frequency")
        out: dict[str, int] = defaultdict(int)
        if not raw:
            return {}
        try:
            data = json.loads(raw) if isinstance(raw, str) else raw
            for ds in data.values():
                for tag, n in ds.items():
                    tag = str(tag).strip()
                    if tag:
                        out[tag] += int(n)
        except Exception:
            return {}
        return dict(out)

    def summary(self) -> dict:
        ranks = sorted(set(self.ranks.values()))
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "modules": len(self.modules),
            "ranks": ranks,
            "formats": list(self.formats),
            "unmatched": len(self.unmatched),
            "ignored": len(self.ignored),
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------------------------
# files
def read_lora_file(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a LoRA file; clear errors for missing or damaged files."""
    from .safe_io import check_input

    path = Path(path)
    if not os.path.lexists(path):
        raise WeightsmithError(f"LoRA file not found: {path}")
    check_input(path, "LoRA", folder_ok=True)
    if path.is_dir():
        cands = [path / "pytorch_lora_weights.safetensors", path / "adapter_model.safetensors"]
        f = next((c for c in cands if c.exists()), None)
        if f is None:
            raise WeightsmithError(
                f"{path} is a folder without pytorch_lora_weights.safetensors or "
                "adapter_model.safetensors; pass the LoRA file itself."
            )
        path = check_input(f, "LoRA")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise WeightsmithError(
                f"could not read LoRA {path.name}: the file is damaged or not a safetensors file "
                f"({type(e).__name__}: {str(e)[:120]}). Re-download or re-save it."
            ) from None
        return tensors, meta
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return load_plain_pickle(path, f"LoRA {path.name}"), {}
    raise WeightsmithError(f"{path.name}: unknown LoRA file type {path.suffix!r}; use .safetensors.")


def load_lora(path, model=None, *, name: str | None = None) -> LoRA:
    """Read a LoRA file and map it onto ``model`` (an :class:`~weightsmith.core.sdmodel.SDModel`).

    Raises :class:`WeightsmithError` when the file is unreadable, holds NaN/Inf, matches no module
    of the model, or was made for another base (shape mismatch or another family's key names).
    Keys naming no module are listed in ``LoRA.unmatched``. Without ``model`` the file is only read
    and checked; :meth:`LoRA.bind` (which ``merge()`` calls) maps it later.
    """
    tensors, meta = read_lora_file(path)
    path = Path(path)
    if flux_lora.looks_like_flux(tensors):
        return flux_lora_from_state_dict(tensors, model, metadata=meta, name=name or path.stem, path=path)
    if model is None:
        for k, t in tensors.items():
            _finite(k, t, path.stem)
        return LoRA(path, name or path.stem, {}, meta, raw=tensors)
    return lora_from_state_dict(tensors, model, metadata=meta, name=name or path.stem, path=path)


# ----------------------------------------------------------------------------------------------
# mapping
class ModuleIndex:
    """Every key prefix a LoRA may use for every weight-bearing module of a model -> canonical (the
    prefixes each module may go by are the family's, ``Family.lora.read_prefixes``)."""

    def __init__(self, model):
        self.family = model.family
        self.layout = model.layout
        self.shapes: dict[str, tuple] = {}
        self.by_key: dict[str, str] = {}
        read_prefixes = families.get(self.family).lora.read_prefixes
        for c, te in model.text_encoders.items():
            for n, m in te.named_modules():
                if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    continue
                canon = f"{c}.{te_path(n)}"
                self.shapes[canon] = tuple(m.weight.shape)
                for key in read_prefixes(canon, self.layout):
                    self._add(key, canon)
        for n, m in model.unet.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            canon = f"{UNET}.{n}"
            self.shapes[canon] = tuple(m.weight.shape)
            for key in read_prefixes(canon, self.layout):
                self._add(key, canon)

    def _add(self, key, canon):
        self.by_key.setdefault(key, canon)

    def lookup(self, prefix: str) -> str | None:
        c = self.by_key.get(prefix)
        if c is None:
            m = _OLD_PROC.search(prefix)
            if m:
                sub = m.group(1)
                c = self.by_key.get(prefix[: m.start()] + "." + (sub + ".0" if sub == "to_out" else sub))
        return c


def _split_key(key: str) -> tuple[str, str] | None:
    for suf, role in _SUFFIXES:
        if key.endswith(suf):
            return key[: -len(suf)], role
    return None


def _key_format(prefix: str) -> str:
    if prefix.startswith("lora_"):
        return "kohya"
    if prefix.startswith(("diffusion_model.", "clip_", "text_encoders.")):
        return "comfyui"
    return "diffusers"


def _family_hint(prefixes, meta) -> str | None:
    return families.lora_family_hint(prefixes, meta)


def _finite(name: str, t: torch.Tensor, lora_name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise WeightsmithError(
            f"LoRA {lora_name} contains NaN or infinite values (in {name}); the file is "
            "broken (often a training run that diverged). Use another file."
        )


def _alpha_of(parts: dict, prefix: str, lora_name: str) -> float | None:
    """The module's alpha as a number, or None when it has none; an alpha tensor with no elements is
    refused (docs/reliability.md, "Inputs")."""
    alpha = parts.get("alpha")
    if alpha is None:
        return None
    if alpha.numel() == 0:
        raise WeightsmithError(
            f"LoRA {lora_name}: {prefix}.alpha has no elements (shape {tuple(alpha.shape)}); the file is damaged."
        )
    return float(alpha.float().reshape(-1)[0])


def _factor_check(t: torch.Tensor, role: str, prefix: str, lora_name: str, dims=(2, 4)) -> None:
    """A LoRA factor is 2-D (or 4-D for convolutions) with no empty dimension (rank >= 1)."""
    if t.dim() not in dims:
        raise WeightsmithError(
            f"LoRA {lora_name}: {prefix} has a {t.dim()}-D {role} factor {tuple(t.shape)}; "
            f"factors are {' or '.join(f'{d}-D' for d in dims)}. The file is damaged."
        )
    if 0 in t.shape:
        raise WeightsmithError(
            f"LoRA {lora_name}: {prefix} has an empty {role} factor {tuple(t.shape)} (rank 0); the file is damaged."
        )


def _lora_to_factors(parts: dict, prefix: str, lora_name: str):
    """(up 2-D, down 2-D, scale, kind, alpha) for kohya/PEFT lora_down/lora_up (+mid, +alpha)."""
    _factor_check(parts["up"], "up", prefix, lora_name)
    _factor_check(parts["down"], "down", prefix, lora_name)
    up, down = parts["up"].float(), parts["down"].float()
    mid = parts.get("mid")
    r = down.shape[0]
    if up.shape[1] != r or (up.dim() == 4 and up.shape[2:] != (1, 1)):
        raise WeightsmithError(
            f"LoRA {lora_name}: {prefix} has up {tuple(up.shape)} and down "
            f"{tuple(down.shape)} of different ranks; the file is damaged."
        )
    kind = "lora"
    if mid is not None:
        _factor_check(mid, "mid", prefix, lora_name, dims=(4,))
        if tuple(mid.shape[:2]) != (r, r):
            raise WeightsmithError(
                f"LoRA {lora_name}: {prefix} has a mid factor {tuple(mid.shape)} that does not "
                f"match its rank {r}; the file is damaged."
            )
        mid = mid.float()
        down = torch.einsum("abhw,bi->aihw", mid, down.reshape(r, -1))
        kind = "locon"
    elif down.dim() == 4 and down.shape[2:] != (1, 1):
        kind = "locon"
    alpha = _alpha_of(parts, prefix, lora_name)
    # alpha 0: kohya's sd-scripts (networks/lora.py) and LyCORIS read it as alpha = rank
    scale = (alpha / r) if alpha else 1.0
    return up.reshape(up.shape[0], r), down.reshape(r, -1), scale, kind, alpha


def _product_shape(a: torch.Tensor, b: torch.Tensor, what: str, prefix: str, lora_name: str) -> tuple:
    """Shape of ``a @ b.reshape(len(b), -1)`` from the factor shapes, inner dimensions checked."""
    _factor_check(a, what + "_a" if what else "factor", prefix, lora_name, dims=(2,))
    _factor_check(b, what + "_b" if what else "factor", prefix, lora_name, dims=(2, 4))
    if a.shape[1] != b.shape[0]:
        raise WeightsmithError(
            f"LoRA {lora_name}: {prefix} has {what}_a {tuple(a.shape)} and {what}_b "
            f"{tuple(b.shape)} whose inner dimensions differ; the file is damaged."
        )
    return (a.shape[0], int(math.prod(b.shape[1:])))


def _full_delta(parts: dict, prefix: str, role_kind: str, lora_name: str, size: int | None = None):
    """Full ΔW (float64, unshaped) for .diff, LoHa and LoKr modules, and its kind. LoHa and LoKr
    product shapes are computed from the factor shapes and must hold ``size`` (the module's element
    count) before anything is formed: a few MB of factors can describe a product of 10^12 entries."""
    if role_kind == "diff":
        return parts["diff"].double(), "full"
    alpha = _alpha_of(parts, prefix, lora_name)

    def fits(shape, what):
        n = int(math.prod(shape))
        if size is not None and n != size:
            raise WeightsmithError(
                f"LoRA {lora_name}: {prefix} is a {what} whose product would be "
                f"{' × '.join(str(x) for x in shape)} = {n:,} entries, but the layer it names has "
                f"{size:,}; the file is damaged or made for another model. Nothing was expanded."
            )

    if role_kind == "loha":
        s1 = _product_shape(parts["hada_w1_a"], parts["hada_w1_b"], "hada_w1", prefix, lora_name)
        s2 = _product_shape(parts["hada_w2_a"], parts["hada_w2_b"], "hada_w2", prefix, lora_name)
        if s1 != s2:
            raise WeightsmithError(
                f"LoRA {lora_name}: {prefix} is a LoHa whose two products differ in shape "
                f"({s1} and {s2}); the file is damaged."
            )
        fits(s1, "LoHa")
        w1 = parts["hada_w1_a"].double() @ parts["hada_w1_b"].double().reshape(parts["hada_w1_b"].shape[0], -1)
        w2 = parts["hada_w2_a"].double() @ parts["hada_w2_b"].double().reshape(parts["hada_w2_b"].shape[0], -1)
        r = parts["hada_w1_b"].shape[0]
        return w1 * w2 * ((alpha / r) if alpha is not None else 1.0), "loha"
    # LoKr
    if "lokr_w1" in parts:
        _factor_check(parts["lokr_w1"], "lokr_w1", prefix, lora_name, dims=(2,))
        a1 = tuple(parts["lokr_w1"].shape)
    else:
        a1 = _product_shape(parts["lokr_w1_a"], parts["lokr_w1_b"], "lokr_w1", prefix, lora_name)
    if "lokr_w2" in parts:
        _factor_check(parts["lokr_w2"], "lokr_w2", prefix, lora_name)
        a2 = (parts["lokr_w2"].shape[0], int(math.prod(parts["lokr_w2"].shape[1:])))
    else:
        a2 = _product_shape(parts["lokr_w2_a"], parts["lokr_w2_b"], "lokr_w2", prefix, lora_name)
    fits((a1[0] * a2[0], a1[1] * a2[1]), "LoKr")
    w1 = parts["lokr_w1"].double() if "lokr_w1" in parts else parts["lokr_w1_a"].double() @ parts["lokr_w1_b"].double()
    w2 = (
        parts["lokr_w2"].double()
        if "lokr_w2" in parts
        else (parts["lokr_w2_a"].double() @ parts["lokr_w2_b"].double().reshape(parts["lokr_w2_b"].shape[0], -1))
    )
    r = None
    if "lokr_w1_b" in parts:
        r = parts["lokr_w1_b"].shape[0]
    elif "lokr_w2_b" in parts:
        r = parts["lokr_w2_b"].shape[0]
    scale = (alpha / r) if (alpha is not None and r is not None) else 1.0
    return torch.kron(w1, w2.reshape(w2.shape[0], -1)) * scale, "lokr"


def factor_full(delta2d: torch.Tensor, rtol: float | None = None):
    """Exact factors of a full delta (core.factor.exact_factors): ``(up, down)`` with up@down == Δ."""
    from .factor import READ_RTOL, exact_factors

    return exact_factors(delta2d, READ_RTOL if rtol is None else rtol)


def lora_from_state_dict(tensors: dict, model, *, metadata: dict | None = None, name: str = "lora", path=None) -> LoRA:
    """Map an in-memory LoRA state dict (any supported layout) onto ``model``: group the keys by
    module, build each module's exact factors, then refuse what cannot be used as a whole."""
    meta = dict(metadata or {})
    if not tensors:
        raise WeightsmithError(f"LoRA {name} holds no tensors; the file is empty or damaged.")
    if model.family == flux_lora.FAMILY or flux_lora.looks_like_flux(tensors):
        return flux_lora_from_state_dict(tensors, model, metadata=meta, name=name, path=path)
    groups, file_keys, unknown = _group_keys(tensors)
    index = ModuleIndex(model)
    hint = _family_hint(list(groups), meta)
    modules: dict[str, LoRAModule] = {}
    unmatched = list(unknown)
    ignored, formats = [], set()
    zero_alpha: list[str] = []
    refused: dict[str, list[str]] = defaultdict(list)
    for prefix, parts in groups.items():
        roles = set(parts) - {"alpha"}
        if roles <= {"ignore"} or not roles:
            ignored.append(prefix)
            continue
        canon = index.lookup(prefix)
        if canon is None:
            unmatched.extend(f"{prefix}{_role_suffix(r)}" for r in parts)
            continue
        for r, t in parts.items():
            if isinstance(t, torch.Tensor):
                _finite(file_keys[prefix].get(r, f"{prefix}{_role_suffix(r)}"), t, name)
        bad = [r for r in roles if r in _REFUSED or r in ("oft", "dora", "glora", "norm", "set_weight")]
        if bad:
            refused[_REFUSED.get(bad[0], bad[0])].append(prefix)
            continue
        if "diff_b" in roles:
            ignored.append(prefix + ".diff_b")
            roles = roles - {"diff_b"}
            if not roles:
                continue
        if canon in modules:
            raise WeightsmithError(
                f"LoRA {name} names module {canon} twice (e.g. in two key layouts); the file is ambiguous."
            )
        mod, fmt = _build_module(parts, roles, prefix, canon, index.shapes[canon], name, hint, model.family)
        formats |= fmt
        if mod.alpha == 0:
            zero_alpha.append(prefix)
        modules[canon] = mod
    _refuse_unusable(name, model.family, refused, modules, unmatched, hint, groups)
    notes = []
    if zero_alpha:
        notes.append(
            f"{len(zero_alpha)} module(s) have alpha 0 (e.g. {zero_alpha[0]}); read as alpha = rank "
            "(scale 1), as kohya's sd-scripts and LyCORIS load them (a literal 0 would make them no-ops)"
        )
    return LoRA(
        Path(path) if path else None, name, modules, meta, tuple(sorted(formats)), unmatched, ignored, notes=notes
    )


def _group_keys(tensors: dict):
    """prefix -> role -> tensor, prefix -> role -> the key as the file spells it, and unknown keys."""
    groups: dict[str, dict] = defaultdict(dict)
    file_keys: dict[str, dict] = defaultdict(dict)
    unknown = []
    for k, v in tensors.items():
        s = _split_key(k)
        if s is None:
            unknown.append(k)
            continue
        groups[s[0]][s[1]] = v
        file_keys[s[0]][s[1]] = k
    return groups, file_keys, unknown


def _build_module(parts: dict, roles: set, prefix: str, canon: str, shape, name: str, hint, family: str):
    """One module's exact 2-D factors (``ΔW = scale · up · down``) and the formats it was read as."""
    out_dim, in_dim = shape[0], int(math.prod(shape[1:]))
    formats = {_key_format(prefix)}
    if roles & {"up", "down"}:
        if not {"up", "down"} <= roles:
            raise WeightsmithError(
                f"LoRA {name}: {prefix} has only one of its two factors (up/down); the file is damaged."
            )
        up, down, scale, kind, alpha = _lora_to_factors(parts, prefix, name)
    else:
        role_kind = "diff" if "diff" in roles else ("loha" if any(r.startswith("hada") for r in roles) else "lokr")
        try:
            full, kind = _full_delta(parts, prefix, role_kind, name, out_dim * in_dim)
        except KeyError as e:
            raise WeightsmithError(
                f"LoRA {name}: {prefix} lacks {e.args[0]}; the file is damaged "
                "or uses a LyCORIS variant Weightsmith does not read."
            ) from None
        if full.numel() != out_dim * in_dim:
            _shape_error(name, prefix, canon, shape, tuple(full.shape), hint, family)
        up, down = factor_full(full.reshape(out_dim, in_dim))
        scale, alpha = 1.0, None
        formats.add("full" if kind == "full" else kind)
    if up.shape[0] != out_dim or down.shape[1] != in_dim:
        _shape_error(name, prefix, canon, shape, (up.shape[0], down.shape[1]), hint, family)
    return LoRAModule(canon, up.contiguous(), down.contiguous(), float(scale), shape, kind, alpha), formats


def _refuse_unusable(name, family, refused, modules, unmatched, hint, groups) -> None:
    """Refuse a file as a whole: unsupported module types, nothing that fits, another family's keys."""
    if refused:
        why, prefixes = next(iter(refused.items()))
        raise WeightsmithError(
            f"LoRA {name} cannot be used: {why} ({len(prefixes)} modules, e.g. "
            f"{prefixes[0]}). Convert it to a plain LoRA or a full-delta (.diff) file."
        )
    if not modules:
        if hint and hint != family:
            raise WeightsmithError(
                f"LoRA {name} was made for {hint.upper()} but the model is "
                f"{family.upper()}; none of its keys fit. Use a LoRA made for this base model."
            )
        raise WeightsmithError(
            f"LoRA {name} matches no module of this {family.upper()} model ({len(unmatched)} keys, "
            f"e.g. {unmatched[:1]}). It was made for another base model or uses an unknown key layout."
        )
    foreign = families.get(family).lora.foreign(list(groups))  # keys of another family's LoRA
    if foreign:
        raise WeightsmithError(
            f"LoRA {name} {foreign} but the model is {family.upper()}; use a LoRA made for this base model."
        )


def _role_suffix(role: str) -> str:
    for suf, r in _SUFFIXES:
        if r == role:
            return suf
    return "." + role


def _shape_error(name, prefix, canon, shape, got, hint, family):
    extra = f" (its metadata or keys say {hint.upper()})" if hint and hint != family else ""
    raise WeightsmithError(
        f"LoRA {name} does not fit this {family.upper()} model{extra}: {prefix} is {got[0]}×{got[1]} but "
        f"{canon} is {shape[0]}×{int(math.prod(shape[1:]))}. Use a LoRA made for this base model."
    )


# ----------------------------------------------------------------------------------------------
# Flux.1 (docs/flux_lora.md)
def flux_lora_from_state_dict(tensors: dict, model=None, *, metadata=None, name: str = "lora", path=None) -> LoRA:
    """A Flux LoRA (any layout of :mod:`~weightsmith.core.layouts.flux_lora`) as a :class:`LoRA` with
    canonical module names (fused BFL layers split into their diffusers modules). Needs no model: each
    module's shape comes from its factors; with ``model`` (family ``"flux"``, answering
    ``model.module(canonical)``) every module must exist there with that shape. A Flux LoRA for an SD
    model, and an SD LoRA for a Flux model, are refused with a :class:`WeightsmithError`."""
    from .naming import family_label

    meta = dict(metadata or {})
    if not tensors:
        raise WeightsmithError(f"LoRA {name} holds no tensors; the file is empty or damaged.")
    fam = getattr(model, "family", None) if model is not None else None
    is_flux = flux_lora.looks_like_flux(tensors)
    if fam is not None and fam != flux_lora.FAMILY and is_flux:
        raise WeightsmithError(
            f"LoRA {name} was made for Flux.1 (its keys name Flux modules) but the model is "
            f"{family_label(fam)}; use a LoRA made for this base model."
        )
    got = flux_lora.read(tensors, name) if is_flux or fam == flux_lora.FAMILY else None
    clip_only = got is not None and got.modules and not got.unmatched
    if not is_flux and not clip_only:
        raise WeightsmithError(
            f"LoRA {name} is not a Flux.1 LoRA (none of its keys names a Flux module"
            f"{', e.g. ' + next(iter(tensors)) if tensors else ''}); it was made for another base model "
            "(SD1.x/SD2.x/SDXL keys such as lora_unet_down_blocks_…). Use a Flux LoRA."
        )
    if not is_flux:
        got.notes.append(
            "the file changes CLIP-L only (no transformer or T5 keys); applied to Flux's CLIP-L text encoder, "
            "as ComfyUI and Forge apply it"
        )
    if not got.modules:
        raise WeightsmithError(
            f"LoRA {name} matches no Flux module ({len(got.unmatched)} keys, e.g. {got.unmatched[:1]}); "
            "it uses an unknown key layout."
        )
    modules = {
        c: LoRAModule(c, m.up, m.down, m.scale, m.shape, m.kind, m.alpha) for c, m in sorted(got.modules.items())
    }
    lora = LoRA(
        Path(path) if path else None,
        name,
        modules,
        meta,
        tuple(sorted(got.formats)),
        list(got.unmatched),
        list(got.ignored),
        notes=list(got.notes),
        family=flux_lora.FAMILY,
    )
    if model is not None:
        _check_flux_fit(lora, model)
    return lora


def _check_flux_fit(lora: LoRA, model) -> None:
    """A Flux LoRA fits ``model``: the model is Flux, and (where it answers ``model.module(name)``)
    has every module of the LoRA with the LoRA's shape."""
    from .naming import family_label

    fam = getattr(model, "family", None)
    if fam != flux_lora.FAMILY:
        raise WeightsmithError(
            f"LoRA {lora.name} was made for Flux.1 (its keys name Flux modules) but the model is "
            f"{family_label(str(fam))}; use a LoRA made for this base model."
        )
    modules, shapes = lora.modules, {}
    if hasattr(model, "weight_shape"):  # a FluxModel: shapes from the files' headers
        held = set(getattr(model, "parts", {}))  # a text encoder not loaded: nothing to check it against
        modules = {c: m for c, m in lora.modules.items() if c.partition(".")[0] in held}
        shapes = {c: s for c in modules if (s := model.weight_shape(c)) is not None}
    elif hasattr(model, "module"):
        for canon in lora.modules:
            try:
                shapes[canon] = tuple(model.module(canon).weight.shape)
            except (KeyError, AttributeError, WeightsmithError):
                pass  # check_shapes names the module the model lacks
    else:
        return
    flux_lora.check_shapes(flux_lora.FluxRead(modules), shapes, lora.name)
