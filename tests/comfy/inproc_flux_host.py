"""Weightsmith's Erase and Save nodes on a Flux MODEL/CLIP, in one process (the ComfyUI venv).

    python inproc_flux_host.py COMFY_DIR WORK_DIR   ->  WORK_DIR/*.safetensors, WORK_DIR/result.json

WORK_DIR holds ``config.json`` (the tiny Flux transformer's ComfyUI ``unet_config``) and the tiny random
Flux as users have it: ``transformer.safetensors`` (BFL names), ``clip_l.safetensors`` and
``t5xxl.safetensors`` (HF names). The MODEL is ComfyUI's own ``comfy.ldm.flux.model.Flux`` built through
``supported_models.Flux`` in a real ``ModelPatcher`` (as UNETLoader gives it); the CLIP is a real
``ModelPatcher`` over a module holding CLIP-L and T5 under ComfyUI's key names (``clip_l.transformer.…``,
``t5xxl.transformer.…``) with ``cond_stage_model.clip_l`` / ``.t5xxl`` (what DualCLIPLoader type flux
gives; ComfyUI's own T5-XXL class has a fixed full size). Then:

1. Erase Concepts (erasepro, cat -> dog): the returned clones patched with ComfyUI's ``patch_model``;
   their weights written (``erase_patched``), then unpatched; the input MODEL/CLIP written again
   (``base_after``) with their patch counts.
2. Save Edit as LoRA on that edit (LoRA + T5 file), the LoRA through ComfyUI's LoraLoader path
   (``comfy.sd.load_lora_for_models``) on the input MODEL/CLIP (``erase_loaded``); ComfyUI's log lines
   "lora key not loaded" counted.
3. A synthetic edit on fused BFL tensors (``qkv`` rows, ``linear1``'s MLP rows, ``norm_out``'s swapped
   halves) and a CLIP-L layer: in-graph (``fused_patched``) and saved + LoraLoader (``fused_loaded``).
4. IterIS Merge on the Flux MODEL: ``concat`` of the step-3 LoRA (×1) and the step-2 LoRA (×0.5) in-graph
   (``merge_patched``) and saved + LoraLoader (``merge_loaded``); ``iteris``: its refusal message.

The test (tests/test_flux_host.py) compares all of it with an independent computation on the files.
"""

import json
import logging
import sys
from pathlib import Path

import torch


class _Tree(torch.nn.Module):
    def __init__(self, sd):
        super().__init__()
        for k, v in sd.items():
            mod = self
            *path, leaf = k.split(".")
            for p in path:
                if not hasattr(mod, p):
                    mod.add_module(p, torch.nn.Module())
                mod = getattr(mod, p)
            mod.register_parameter(leaf, torch.nn.Parameter(v.clone(), requires_grad=False))


class _Clip:
    """What the nodes and load_lora_for_models use of comfy.sd.CLIP."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.cond_stage_model = patcher.model
        self.layer_idx = None

    def clone(self):
        return _Clip(self.patcher.clone())

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)


def _weights(patcher) -> dict:
    """The patcher's weights under ComfyUI's keys (the MODEL's ``diffusion_model.…``, the CLIP's own)."""
    sd = patcher.model.state_dict()
    keep = [k for k in sd if k.startswith(("diffusion_model.", "clip_l.", "t5xxl."))]
    return {k: sd[k].detach().float().clone().contiguous() for k in keep}


def _patched(model, clip) -> dict:
    """Weights of a MODEL/CLIP clone pair as ComfyUI patches them for sampling, then unpatched."""
    out = {}
    for p in (model, clip.patcher):
        p.patch_model()
        out.update(_weights(p))
        p.unpatch_model()
    return out


def main(comfy_dir: str, work: str) -> None:
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    args.force_fp32 = True
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import folder_paths
    from safetensors.torch import load_file, save_file

    work = Path(work)
    folder_paths.set_output_directory(str(work / "output"))
    cfg = json.loads((work / "config.json").read_text())
    mc = comfy.supported_models.Flux(cfg)
    mc.set_inference_dtype(torch.float32, None)
    bm = mc.get_model({}, device=torch.device("cpu"))
    bm.diffusion_model.load_state_dict(load_file(str(work / "transformer.safetensors")), strict=True)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(bm, load_device=cpu, offload_device=cpu)
    te = {"clip_l.transformer." + k: v for k, v in load_file(str(work / "clip_l.safetensors")).items()}
    te.update({"t5xxl.transformer." + k: v for k, v in load_file(str(work / "t5xxl.safetensors")).items()})
    clip = _Clip(comfy.model_patcher.ModelPatcher(_Tree(te), load_device=cpu, offload_device=cpu))
    base_before = {**_weights(model), **_weights(clip.patcher)}

    from weightsmith.core.edit import Edit
    from weightsmith.nodes import comfy_adapter as ca
    from weightsmith.nodes.erase_node import WeightsmithEraseConcepts
    from weightsmith.nodes.merge_nodes import WeightsmithIterISMerge
    from weightsmith.nodes.save_node import WeightsmithSaveEditAsLora

    missed = []

    class Grab(logging.Handler):
        def emit(self, record):
            if "not loaded" in record.getMessage().lower():
                missed.append(record.getMessage())

    def loraloader(path):
        logging.getLogger().addHandler(grab := Grab())
        try:
            lora = comfy.utils.load_torch_file(str(path))
            m2, c2 = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        finally:
            logging.getLogger().removeHandler(grab)
        return _patched(m2, c2), len(lora)

    res = {}

    def saved_lora(edit, prefix):
        """Save Edit as LoRA: (the node's output, the written file)."""
        saved = WeightsmithSaveEditAsLora().run(edit, prefix, 0)
        return saved, work / "output" / "loras" / saved["result"][0]

    def through_loraloader(path, tag):
        """``path`` through ComfyUI's LoraLoader: weights to ``<tag>_loaded``, keys not loaded and count to res."""
        missed.clear()
        loaded, n_keys = loraloader(path)
        save_file(loaded, str(work / f"{tag}_loaded.safetensors"))
        res[f"{tag}_not_loaded"], res[f"{tag}_lora_keys"] = list(missed), n_keys

    # 1. erase in-graph
    out = WeightsmithEraseConcepts().run(model, clip, "cat", "dog", "erasepro", 1.0, prompt_expansion="off")
    m_e, c_e, edit, text, image = out["result"]
    res["erase_report_head"] = text.splitlines()[0]
    res["erase_modules"] = sorted(edit.deltas)
    res["clones"] = m_e is not model and c_e is not clip
    save_file(_patched(m_e, c_e), str(work / "erase_patched.safetensors"))
    after = {**_weights(model), **_weights(clip.patcher)}
    res["base_bit_identical"] = sorted(after) == sorted(base_before) and all(
        torch.equal(after[k], base_before[k]) for k in after
    )
    res["base_patches"] = len(model.patches) + len(clip.patcher.patches)
    # 2. save + ComfyUI's LoraLoader
    saved, lora_path = saved_lora(edit, "weightsmith/flux")
    res["save_text"] = saved["ui"]["weightsmith_report"][0]
    res["lora_file"] = str(lora_path)
    res["t5_files"] = sorted(str(p) for p in lora_path.parent.glob("*_t5xxl.safetensors"))
    through_loraloader(lora_path, "erase")
    # 3. fused rows: a synthetic low-rank edit through the same adapter and writer
    g = torch.Generator().manual_seed(3)
    names = {
        "transformer.transformer_blocks.0.attn.to_k": (32, 32),
        "transformer.transformer_blocks.0.attn.add_v_proj": (32, 32),
        "transformer.single_transformer_blocks.0.proj_mlp": (128, 32),
        "transformer.single_transformer_blocks.0.attn.to_q": (32, 32),
        "transformer.norm_out.linear": (64, 32),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (64, 64),
    }
    deltas, factors = {}, {}
    for n, (o, i) in names.items():
        up, down = torch.randn(o, 2, generator=g) * 0.05, torch.randn(2, i, generator=g) * 0.05
        deltas[n], factors[n] = up @ down, (up, down)
    fused = Edit("flux", {}, deltas, factors, {"method": "test"})
    torch.save({"deltas": deltas}, str(work / "fused_truth.pt"))
    m_f, c_f = ca.apply_edit(model, clip, fused)
    save_file(_patched(m_f, c_f), str(work / "fused_patched.safetensors"))
    _, fused_path = saved_lora(fused, "weightsmith/fused")
    through_loraloader(fused_path, "fused")
    # 4. IterIS Merge on Flux (concat: the fused LoRA ×1 + the erase LoRA ×0.5), in-graph, saved, LoraLoader
    stack = [
        {"path": str(fused_path), "weight": 1.0, "prompts": (), "name": "fused"},
        {"path": str(lora_path), "weight": 0.5, "prompts": (), "name": "erase"},
    ]
    m_m, c_m, merged, _, _ = WeightsmithIterISMerge().run(model, clip, stack, "concat", 1, 1, 1, 512, 0)["result"]
    save_file(_patched(m_m, c_m), str(work / "merge_patched.safetensors"))
    through_loraloader(saved_lora(merged, "weightsmith/fluxmerge")[1], "merge")
    # 5. IterIS in-graph (one iteration, one sample, one step at 64 px, each LoRA its own prompt): saved, and
    #    through LoraLoader; its ΔW and options kept for the test to compare with core's merge of the files
    stack = [dict(stack[0], prompts=("a red cat on a tree",)), dict(stack[1], prompts=("a dog at night",))]
    m_i, c_i, it_edit, it_text, _ = WeightsmithIterISMerge().run(model, clip, stack, "iteris", 1, 1, 1, 64, 0)["result"]
    save_file(_patched(m_i, c_i), str(work / "iteris_patched.safetensors"))
    through_loraloader(saved_lora(it_edit, "weightsmith/fluxiteris")[1], "iteris")
    torch.save({"deltas": {n: it_edit.deltas[n] for n in it_edit.deltas}}, str(work / "iteris_deltas.pt"))
    res["iteris_options"] = it_edit.report["options"]
    res["iteris_loras"] = [str(fused_path), str(lora_path)]
    res["iteris_report_head"] = it_text.splitlines()[0]
    (work / "result.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
