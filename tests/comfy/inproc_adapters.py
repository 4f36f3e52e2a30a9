"""SD2 and SDXL adapter checks against ComfyUI's real classes, in one process (the ComfyUI venv).

    python inproc_adapters.py COMFY_DIR  ->  prints one JSON line of measurements

ComfyUI's own CLIP objects (``comfy.sd.CLIP`` with ``SD2ClipModel`` / ``SDXLClipModel``, real
configs: OpenCLIP-H 24×1024, CLIP-L 12×768 + bigG 32×1280) get seeded random weights; the UNet is a
small SD2/SDXL-shaped one (context 1024 / 2048, SDXL's label embedding) loaded through ComfyUI's
``model_detection`` and ``supported_models.SD20`` / ``SDXL`` into a real ``ModelPatcher``. A
"LoRA applied upstream" is simulated with ``diff`` patches before the adapter runs. The test
asserts on the numbers (tests/test_comfy_adapters.py).
"""

import json
import sys

import torch

PROMPT = "a watercolor painting of a lighthouse at dusk"


def _loraloader_errors(fam, up_m, up_c, sdm, comps) -> dict:
    """Per written LoRA (erase: each method; merge: concat), the worst ‖applied − ΔW‖/‖ΔW‖ over its
    modules after ComfyUI's own loader applied it, and the keys ComfyUI did not load."""
    import logging
    import tempfile

    import comfy.sd
    import comfy.utils

    from weightsmith.core.erase import EraseOptions, erase
    from weightsmith.core.lab.random_loras import random_lora
    from weightsmith.core.lora_read import lora_from_state_dict
    from weightsmith.core.lora_write import save_lora
    from weightsmith.core.merge import merge, save_merge
    from weightsmith.core.naming import UNetLayout, comfy_key
    from weightsmith.nodes import comfy_adapter as ca

    class Grab(logging.Handler):
        def __init__(self):
            super().__init__()
            self.missed = []

        def emit(self, rec):
            msg = rec.getMessage()
            if "not loaded" in msg:
                self.missed.append(msg)

    edits = {}
    for method in ("erasepro", "zero-residual", "uce"):
        edits[method] = erase(sdm, ["cat"], ["dog"], method=method, options=EraseOptions(expand_prompts=False))
    loras = [
        lora_from_state_dict(random_lora(sdm, groups=g, rank=rk, seed=sd_, strength=0.05)[0], sdm, name=f"l{sd_}")
        for sd_, g, rk in ((1, ("attn", "te"), 4), (2, ("kv", "te"), 2))
    ]
    edits["merge-concat"] = merge(sdm, loras, "concat", weights=[1.0, 0.5])
    out = {}
    layout = UNetLayout.from_config(sdm.unet_config)
    with tempfile.TemporaryDirectory() as tmp:
        for label, edit in edits.items():
            path = f"{tmp}/{label}.safetensors"
            if label.startswith("merge"):
                save_merge(edit, sdm, path, loras=loras)
            else:
                save_lora(edit, path)
            grab = Grab()
            logging.getLogger().addHandler(grab)
            try:
                m2, c2 = comfy.sd.load_lora_for_models(up_m, up_c, comfy.utils.load_torch_file(path), 1.0, 1.0)
            finally:
                logging.getLogger().removeHandler(grab)
            eff_m = ca.EffectiveWeights(m2, ("diffusion_model.",))
            eff_c = ca.EffectiveWeights(c2.patcher, tuple(p + "." for p in comps.values()))
            worst, floor = 0.0, 0.0
            for name, d in edit.deltas.items():
                key = comfy_key(name + ".weight", fam, layout)
                eff = eff_m if key.startswith("diffusion_model.") else eff_c
                w = sdm.weight(name).double()
                got = eff[key].double().reshape(d.shape) - w
                dn = d.double().norm()
                worst = max(worst, float((got - d.double()).norm() / dn))
                # storing W + ΔW in float32 alone moves each entry by up to 2^-24 of it: the part of the
                # error no loader can avoid, relative to ‖ΔW‖
                floor = max(floor, float(2.0**-24 * (w + d.double()).norm() / dn))
            out[label] = {
                "max_rel_err": worst,
                "float32_floor": floor,
                "modules": len(edit.deltas),
                "not_loaded": grab.missed[:3],
                "n_not_loaded": len(grab.missed),
            }
    return out


def main(comfy_dir: str) -> dict:
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    args.force_fp32 = True
    args.fp32_text_enc = True
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.supported_models_base as smb
    from comfy import sdxl_clip
    from comfy.text_encoders import sd2_clip

    from weightsmith.core.edit import Edit
    from weightsmith.core.lab.random_models import unet_config
    from weightsmith.core.naming import TE1, TE2, UNetLayout
    from weightsmith.nodes import comfy_adapter as ca

    torch.manual_seed(0)
    results = {}
    for fam in ("sd2", "sdxl"):
        r = results[fam] = {}
        target = (
            smb.ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel)
            if fam == "sd2"
            else smb.ClipTarget(sdxl_clip.SDXLTokenizer, sdxl_clip.SDXLClipModel)
        )
        clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in sorted(clip.cond_stage_model.named_parameters()):
                base = 1.0 if ("norm" in n and n.endswith("weight")) else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * (0.02 if base == 0 else 0.05))
        # a small UNet of the family's shape, through ComfyUI's own detection and model classes
        ctx = 1024 if fam == "sd2" else 2048
        ucfg = unet_config(fam, "tiny", ctx)
        ucfg.update(block_out_channels=(64, 128), norm_num_groups=32)
        if fam == "sdxl":
            ucfg["projection_class_embeddings_input_dim"] = 1280 + 6 * ucfg["addition_time_embed_dim"]
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**ucfg)
        layout = UNetLayout.from_config(ucfg)
        sd = {}
        for k, v in unet.state_dict().items():
            mod, _, leaf = k.rpartition(".")
            sd["model.diffusion_model." + layout.to_ldm(mod) + "." + leaf] = v
        ucomfy = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
        mcfg = comfy.supported_models.SD20(ucomfy) if fam == "sd2" else comfy.supported_models.SDXL(ucomfy)
        bm = mcfg.get_model(sd, "model.diffusion_model.", device=torch.device("cpu"))
        bm.load_model_weights(sd, "model.diffusion_model.")
        model = comfy.model_patcher.ModelPatcher(
            bm, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
        )

        # "LoRAs applied upstream": diff patches on clones (the adapter must see them)
        comps = {TE1: "clip_h" if fam == "sd2" else "clip_l"}
        if fam == "sdxl":
            comps[TE2] = "clip_g"
        up_m, up_c = model.clone(), clip.clone()
        te_key = {c: f"{p}.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight" for c, p in comps.items()}
        unet_names = [n for n in up_m.model_state_dict() if n.endswith("attn2.to_k.weight")]
        ukey = sorted(unet_names)[0]
        pre = {}
        for key in list(te_key.values()) + [ukey]:
            w = (up_m if key == ukey else up_c.patcher).model_state_dict()[key]
            pre[key] = torch.randn(w.shape, generator=g) * 0.01
        assert len(up_m.add_patches({ukey: ("diff", (pre[ukey],))}, 1.0)) == 1
        assert len(up_c.add_patches({k: ("diff", (pre[k],)) for k in te_key.values()}, 1.0)) == len(te_key)

        sdm = ca.sdmodel_from_comfy(up_m, up_c)
        r["family"] = sdm.family
        r["te_layers"] = {c: t.config.num_hidden_layers for c, t in sdm.text_encoders.items()}
        r["context_dim"] = sdm.context_dim
        # effective weights = stored + upstream patch
        errs = []
        for c, key in te_key.items():
            stored = clip.patcher.model_state_dict()[key].float()
            got = sdm.weight(f"{c}.text_model.encoder.layers.0.self_attn.k_proj")
            errs.append(float((got - stored - pre[key]).abs().max()))
        ucanon = "unet." + layout.to_diffusers(ukey[len("diffusion_model.") :].rsplit(".", 1)[0])
        stored = model.model_state_dict()[ukey].float()
        errs.append(float((sdm.weight(ucanon) - stored - pre[ukey]).abs().max()))
        r["effective_weight_err"] = max(errs)

        # encodings: ComfyUI's CLIP (patches applied by ComfyUI) vs core's SDModel
        tokens = up_c.tokenize(PROMPT)
        cond, pooled = up_c.encode_from_tokens(tokens, return_pooled=True)
        enc = sdm.encode([PROMPT])
        r["cond_shape"] = list(cond.shape)
        r["cond_rel_err"] = float((enc.context[0] - cond[0].float()).norm() / cond.float().norm())
        if fam == "sdxl":
            r["pooled_rel_err"] = float((enc.pooled[0] - pooled[0].float()).norm() / pooled.float().norm())
        else:  # clip-skip: CLIPSetLastLayer(-3) on SD2 = one layer before the default penultimate
            c3 = up_c.clone()
            c3.clip_layer(-3)
            cond3, _ = c3.encode_from_tokens(c3.tokenize(PROMPT), return_pooled=True)
            sdm3 = ca.sdmodel_from_comfy(up_m, c3)
            r["clip_skip"] = ca.clip_skip_from_clip(c3, fam)
            r["cond_skip_rel_err"] = float(
                (sdm3.encode([PROMPT]).context[0] - cond3[0].float()).norm() / cond3.float().norm()
            )
            r["cond_skip_differs"] = float((cond3 - cond).norm() / cond.norm())

        # our LoRA files through ComfyUI's LoraLoader path (comfy.sd.load_lora_for_models, what the
        # node calls): every key loads and the weights the sampler gets are base + ΔW (issue 12)
        r["loraloader"] = _loraloader_errors(fam, up_m, up_c, sdm, comps)

        # a hand-made edit: ComfyUI must accept every key, on clones only
        deltas = {}
        for c in comps:
            for sub in ("k_proj", "v_proj"):
                name = f"{c}.text_model.encoder.layers.1.self_attn.{sub}"
                deltas[name] = torch.randn(sdm.weight(name).shape, generator=g) * 0.01
        for n in sdm.unet_cross_attention_names()[:2]:
            deltas[n + ".to_v"] = torch.randn(sdm.weight(n + ".to_v").shape, generator=g) * 0.01
        edit = Edit(fam, sdm.unet_config, deltas)
        n_before = (len(up_m.patches), len(up_c.patcher.patches))
        m2, c2 = ca.apply_edit(up_m, up_c, edit, 1.0)
        r["inputs_untouched"] = (len(up_m.patches), len(up_c.patcher.patches)) == n_before and m2 is not up_m
        eff_m = ca.EffectiveWeights(m2, ("diffusion_model.",))
        eff_c = ca.EffectiveWeights(c2.patcher, tuple(p + "." for p in comps.values()))
        layout2 = UNetLayout.from_config(edit.unet_config)
        from weightsmith.core.naming import comfy_key

        e2 = []
        for name, d in deltas.items():
            key = comfy_key(name + ".weight", fam, layout2)
            eff = eff_m if key.startswith("diffusion_model.") else eff_c
            e2.append(float((eff[key] - sdm.weight(name) - d).abs().max()))
        r["patched_weight_err"] = max(e2)
        # what the sampler would use: ComfyUI loads the clone with its patches applied
        mm.load_models_gpu([m2], force_patch_weights=True)
        n0 = sdm.unet_cross_attention_names()[0] + ".to_v"
        key0 = comfy_key(n0 + ".weight", fam, layout2)
        live = m2.model.state_dict()[key0].float()
        r["loaded_weight_err"] = float((live - sdm.weight(n0) - deltas[n0]).abs().max())
        mm.unload_all_models()
        del clip, up_c, c2, sdm, model, up_m, m2, bm, eff_m, eff_c, enc, cond, pooled, tokens
        if fam == "sd2":
            del c3, cond3, sdm3
        import gc

        gc.collect()
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
