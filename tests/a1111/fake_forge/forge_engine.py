"""Forge's backend (backend/patcher, backend/memory_management, backend/diffusion_engine), stand-in:
what the Weightsmith tab and a generation touch, behaving like Forge 2.0.1v1.10.1 where it matters
(written from its behaviour, see README.md).

- ``ModelPatcher``: ``clone()`` shares the module and copies ``lora_patches``
  ``{identifier: {key: [[strength_patch, value, strength_model, offset, function], …]}}``;
  ``add_patches(*, filename, patches, strength_patch, strength_model, online_mode)`` is keyword-only,
  keeps only keys of ``model.named_parameters()`` and returns them.
- ``LoraLoader`` (one per module, shared by all clones): ``refresh`` does nothing while
  ``str(list(lora_patches))`` is unchanged; else restores its backups, then merges every key's
  patches in order in float32 (``diff`` of another shape: printed and skipped; ``lora``: up @ down)
  into a new Parameter, backing up the original first.
- ``load_model_gpu(patcher)``: refreshes only when this patcher object is not the one loaded for
  its module (Forge's ``LoadedModel`` equality is patcher identity).
- Engines (sd1 / sd2 / sdxl): ``forge_objects`` / ``forge_objects_original`` /
  ``forge_objects_after_applying_lora`` (``ForgeObjects``, ``shallow_copy`` shares the patchers),
  ``current_lora_hash = str([])``, ``is_sd1/2/xl``, ``cond_stage_model = None``; UNet patcher over
  a ``KModel`` (``diffusion_model`` with LDM names), CLIP over a ``JointTextEncoder``
  (``clip_l`` / ``clip_h`` / ``clip_g`` → ``transformer.text_model…``, the transformers 4.x layout);
  ``get_learned_conditioning`` loads the CLIP patcher, then encodes.
"""

import copy

import fake_sd
import torch
from torch import nn

_loaded = {}  # id(module) -> the patcher loaded for it


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.loaded_hash = str([])

    @torch.no_grad()
    def refresh(self, lora_patches):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return
        merged = {}
        for _ident, patches in lora_patches.items():
            for key, cur in patches.items():
                merged[key] = merged.get(key, []) + cur
        for k, w in self.backup.items():
            _set(self.model, k, w)
        self.backup = {}
        for key, cur in merged.items():
            weight = _get(self.model, key)
            self.backup[key] = weight
            w = weight.detach().to(torch.float32).clone()
            for strength_patch, value, strength_model, _offset, _function in cur:
                if strength_model != 1.0:
                    w = w * strength_model
                kind, payload = value
                if kind == "diff":
                    d = payload[0]
                    if d.shape != w.shape:
                        print(f"WARNING SHAPE MISMATCH {key} WEIGHT NOT MERGED {d.shape} != {w.shape}")
                        continue
                    w = w + strength_patch * d.to(torch.float32)
                elif kind == "lora":
                    up, down = payload[0].to(torch.float32), payload[1].to(torch.float32)
                    w = w + strength_patch * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
                else:
                    raise ValueError(f"stand-in: patch type {kind} not modelled")
            _set(self.model, key, nn.Parameter(w.to(weight.dtype), requires_grad=False))
        self.loaded_hash = hashes


def _get(model, key):
    mod, _, leaf = key.rpartition(".")
    return getattr(model.get_submodule(mod), leaf)


def _set(model, key, value):
    mod, _, leaf = key.rpartition(".")
    setattr(model.get_submodule(mod), leaf, value)


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.lora_patches = {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)

    def clone(self):
        n = ModelPatcher.__new__(type(self))
        n.model = self.model
        n.lora_patches = self.lora_patches.copy()
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        ident = (filename, strength_patch, strength_model, online_mode)
        keys = {k for k, _ in self.model.named_parameters()}
        this, got = {}, set()
        for k in patches:
            if k in keys:
                got.add(k)
                this.setdefault(k, []).append([strength_patch, patches[k], strength_model, None, None])
        self.lora_patches[ident] = this
        return got

    def refresh_loras(self):
        self.model.lora_loader.refresh(self.lora_patches)


class UnetPatcher(ModelPatcher):
    pass


class CLIP:
    def __init__(self, cond_stage_model, tokenizer):
        self.cond_stage_model = cond_stage_model
        self.tokenizer = tokenizer
        self.patcher = ModelPatcher(cond_stage_model)

    def clone(self):
        n = CLIP.__new__(CLIP)
        n.cond_stage_model, n.tokenizer = self.cond_stage_model, self.tokenizer
        n.patcher = self.patcher.clone()
        return n

    def add_patches(self, *a, **kw):
        return self.patcher.add_patches(*a, **kw)


def load_model_gpu(patcher):
    if _loaded.get(id(patcher.model)) is not patcher:
        patcher.refresh_loras()
        _loaded[id(patcher.model)] = patcher


def use_forge_patcher(forge_dir) -> None:
    """Forge's own patcher system in place of the stand-in's, imported from a Forge source folder (run on
    the CPU, ``--always-cpu``): ``backend.patcher.base.ModelPatcher`` (``clone``, keyword-only
    ``add_patches``, ``refresh_loras``), the per-module ``backend.patcher.lora.LoraLoader`` (``refresh``:
    backups, ``merge_lora_to_weight``) and ``backend.memory_management.load_model_gpu``. Engines built
    afterwards hold Forge's patchers; ``forge_modules()`` names what to drop from ``sys.modules`` after."""
    global ModelPatcher, UnetPatcher, LoraLoader, load_model_gpu
    import sys

    argv, sys.argv = sys.argv, [sys.argv[0], "--always-cpu"]  # Forge parses its flags at import
    sys.path.insert(0, str(forge_dir))
    try:
        from backend import memory_management
        from backend.patcher.base import ModelPatcher as ForgeModelPatcher
        from backend.patcher.lora import LoraLoader as ForgeLoraLoader
    finally:
        sys.argv = argv
        sys.path.remove(str(forge_dir))
    cpu = torch.device("cpu")

    class ForgePatcher(ForgeModelPatcher):
        def __init__(self, model, load_device=cpu, offload_device=cpu, *a, **kw):
            super().__init__(model, load_device, offload_device, *a, **kw)

    ModelPatcher = UnetPatcher = ForgePatcher
    LoraLoader = ForgeLoraLoader
    load_model_gpu = memory_management.load_model_gpu


def forge_modules() -> list:
    import sys

    return [m for m in sys.modules if m.split(".")[0] in ("backend", "packages_3rdparty")]


class ForgeObjects:
    def __init__(self, unet, clip, vae=None, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class KModel(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.storage_dtype = torch.float32


class IntegratedCLIP(nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.transformer = fake_sd.HF430(hf)


CLIP_NAMES = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}


class Engine:
    """ForgeDiffusionEngine (sd15 / sd20 / sdxl)."""

    def __init__(self, family, ldm_sd, hf_encoders, tokenizer):
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = family == "sd1", family == "sd2", family == "sdxl", False
        self.cond_stage_model = None
        self.family = family
        unet = UnetPatcher(KModel(fake_sd.tree_from_state(ldm_sd, "model.diffusion_model.")).requires_grad_(False))
        joint = nn.ModuleDict(
            {name: IntegratedCLIP(copy.deepcopy(te)) for name, te in zip(CLIP_NAMES[family], hf_encoders)}
        ).requires_grad_(False)
        clip = CLIP(joint, tokenizer)
        self.forge_objects = ForgeObjects(unet, clip)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])

    @torch.no_grad()
    def get_learned_conditioning(self, prompts):
        clip = self.forge_objects.clip
        load_model_gpu(clip.patcher)
        outs = [
            fake_sd._hf_encode(clip.cond_stage_model[n], clip.tokenizer, list(prompts)).float()
            for n in CLIP_NAMES[self.family]
        ]
        return torch.cat(outs, -1)


class _Tree(nn.Module):
    """Parameters at the dotted names of a flat state dict (Forge's Flux modules, by their keys)."""

    def __init__(self, sd):
        super().__init__()
        for k, v in sd.items():
            mod = self
            *path, leaf = k.split(".")
            for p in path:
                if not hasattr(mod, p):
                    mod.add_module(p, nn.Module())
                mod = getattr(mod, p)
            mod.register_parameter(leaf, nn.Parameter(v.detach().clone(), requires_grad=False))


class FluxEngine:
    """Forge's Flux engine (backend/diffusion_engine/flux.py): no ``is_sd*`` flag set; the UNet patcher
    over a ``KModel`` whose ``diffusion_model`` has BFL names, the CLIP patcher over a joint encoder with
    ``clip_l.transformer.text_model…`` and ``t5xxl.transformer.encoder…``. ``get_learned_conditioning``
    loads the CLIP patcher and returns its weights (no sampler is modelled: the test reads weights)."""

    def __init__(self, bfl_sd, te_sd):
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False
        self.cond_stage_model = None
        unet = UnetPatcher(KModel(_Tree(bfl_sd)))
        clip = CLIP(_Tree(te_sd), None)
        self.forge_objects = ForgeObjects(unet, clip)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])

    @torch.no_grad()
    def get_learned_conditioning(self, prompts):
        clip = self.forge_objects.clip
        load_model_gpu(clip.patcher)
        return {k: v.detach().clone() for k, v in clip.patcher.model.state_dict().items()}


def build_flux(checkpoint, additional_modules):
    """A FluxEngine from a BFL transformer file or an all-in-one checkpoint plus text-encoder files."""
    from safetensors.torch import load_file

    sd = load_file(str(checkpoint))
    pre = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in sd) else ""
    bfl = {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre) and not k.startswith("text_encoders.")}
    te = {k.removeprefix("text_encoders."): v for k, v in sd.items() if k.startswith("text_encoders.")}
    for f in additional_modules:
        m = load_file(str(f))
        name = "clip_l" if any(k.startswith("text_model.") for k in m) else "t5xxl"
        te.update({f"{name}.transformer.{k}": v for k, v in m.items()})
    return FluxEngine(bfl, te)


def build_from_checkpoint(checkpoint_info, additional_modules=()):
    """The stand-in's loader: an engine from a single-file checkpoint (read with Weightsmith's own
    reader for the text encoders' transformers objects; Forge uses its own loader)."""
    from weightsmith.core.flux_io import is_flux
    from weightsmith.core.model_io import load_model, to_ldm_state_dict

    if is_flux(checkpoint_info.filename):
        return build_flux(checkpoint_info.filename, additional_modules)

    m = load_model(checkpoint_info.filename, tokenizer=TOKENIZER)
    encs = [m.text_encoders[c] for c in sorted(m.text_encoders)]
    return Engine(m.family, to_ldm_state_dict(m), encs, m.tokenizers["text_encoder"])


TOKENIZER = None  # set by the tests (an offline CLIP tokenizer folder)


def install():
    from modules import sd_models

    sd_models.ENGINE_BUILDER = build_from_checkpoint
