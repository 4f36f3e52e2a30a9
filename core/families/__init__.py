"""The model families Weightsmith edits, one module each (docs/method.md, "Model families").

Every module of this package that defines ``FAMILY`` (a :class:`~.base.Family`) is registered when
the package is imported: adding a family is adding its module (and its tests). :func:`get` gives a
family by name; :func:`all_families` lists them in detection order; :func:`detect_from_keys`,
:func:`detect_from_components` and :func:`lora_family_hint` recognise a family from a checkpoint's
keys, from loaded components, or from a LoRA file. The shared Stable Diffusion pieces live in
:mod:`.sd_common`; :mod:`.base` declares the interface.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import WeightsmithError
from .base import Family

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` (replacing one of the same name) and return it."""
    if not isinstance(family, Family):
        raise TypeError(f"not a Family: {family!r}")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a registered family (tests that plant one remove it again)."""
    _REGISTRY.pop(name, None)


def discover(package: str = __name__) -> list[str]:
    """Import every module of ``package`` and register the ``FAMILY`` each defines; the names found."""
    pkg = importlib.import_module(package)
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{package}.{info.name}")
        fam = getattr(mod, "FAMILY", None)
        if isinstance(fam, Family):
            register(fam)
            found.append(fam.name)
    return found


def all_families() -> list[Family]:
    """Every registered family in detection order (priority, then name)."""
    return sorted(_REGISTRY.values(), key=lambda f: (f.priority, f.name))


def names() -> list[str]:
    return [f.name for f in all_families()]


def get(name) -> Family:
    """The family called ``name`` (a :class:`Family` is returned as it is)."""
    if isinstance(name, Family):
        return name
    fam = _REGISTRY.get(name)
    if fam is None:
        raise WeightsmithError(
            f"unknown model family {name!r}; Weightsmith edits {supported_phrase()} ({', '.join(sorted(_REGISTRY))})."
        )
    return fam


def label(name: str) -> str:
    """``sd1`` → ``SD1.x`` (an unknown family is shown as it is)."""
    fam = _REGISTRY.get(name)
    return fam.label if fam else name


def labels() -> dict[str, str]:
    """name → label of every family, in the order users read them (SD1.x, SD2.x, SDXL, …)."""
    return {f.name: f.label for f in sorted(_REGISTRY.values(), key=lambda f: (f.listed, f.name))}


def supported_phrase() -> str:
    """The families Weightsmith edits as one phrase: ``SD1.x, SD2.x and SDXL``."""
    ls = list(labels().values())
    return ls[0] if len(ls) == 1 else ", ".join(ls[:-1]) + " and " + ls[-1]


def detect_from_keys(keys) -> str:
    """The family of a single-file checkpoint from its keys; a sentence naming what the file is
    instead (a UNet-only file, a LoRA, no model Weightsmith edits) otherwise."""
    ks = set(keys)
    for fam in all_families():
        if fam.recognise_keys(ks):
            return fam.name
    if any(k.startswith(fam.checkpoint.denoiser_prefix) for fam in all_families() for k in ks):
        raise WeightsmithError(
            "unknown model family: the checkpoint has a UNet but no text encoder Weightsmith recognises "
            "(expected cond_stage_model.* for SD1.x/SD2.x or conditioner.embedders.* for SDXL). "
            "Use a full checkpoint, not a UNet-only file."
        )
    if any(k.startswith(("lora_", "lora_unet", "lora_te")) or ".lora_down." in k for k in ks):
        raise WeightsmithError("this file is a LoRA, not a model checkpoint. Pass the base model to --model.")
    raise WeightsmithError(
        "this file is not a Stable Diffusion model (no model.diffusion_model.* UNet keys). Pass an SD1.x, "
        "SD2.x or SDXL .safetensors checkpoint or a diffusers folder."
    )


def detect_from_components(te_configs: list, denoiser_config=None) -> str:
    """The family of loaded components (text-encoder configs, the denoiser's config); raises when
    none claims them or they do not belong together."""
    for fam in all_families():
        if fam.recognise_components(te_configs, denoiser_config):
            fam.check_components(te_configs, denoiser_config)
            return fam.name
    raise WeightsmithError(
        f"unknown model family: found {len(te_configs)} text encoders; Stable Diffusion 1.x/2.x "
        "have one and SDXL has two. Pass an SD1.x, SD2.x or SDXL model."
    )


def lora_family_hint(prefixes, meta) -> str | None:
    """The family a LoRA says it was made for: its metadata first (``ss_base_model_version`` or
    ``modelspec.architecture``), else its key prefixes; None when neither tells."""
    v = str(meta.get("ss_base_model_version", "") or meta.get("modelspec.architecture", "")).lower()
    for fam in all_families():
        if fam.lora.metadata_hint(v):
            return fam.name
    prefixes = list(prefixes)
    for fam in all_families():
        if fam.lora.key_hint(prefixes):
            return fam.name
    return None


discover()

__all__ = [
    "Family",
    "all_families",
    "detect_from_components",
    "detect_from_keys",
    "discover",
    "get",
    "label",
    "labels",
    "lora_family_hint",
    "names",
    "register",
    "supported_phrase",
    "unregister",
]
