"""Test-only ComfyUI nodes (linked into the test server's custom_nodes, never shipped).

WeightsmithTestProbe records what the sampler will actually compute: it loads the MODEL the way
KSampler does (``load_models_gpu(..., force_patch_weights=True)`` applies every patch to the
weights), then writes, for every UNet cross-attention, K = c·W_kᵀ and V = c·W_vᵀ for the given
CONDITIONING c, plus c itself, to ``output/probes/<name>.safetensors``. It does not use any
Weightsmith code, so tests can compare it with core's own prediction.
"""

import os


class WeightsmithTestProbe:
    CATEGORY = "testing"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "conditioning": ("CONDITIONING",),
                "name": ("STRING", {"default": "probe"}),
            }
        }

    def run(self, model, conditioning, name):
        import comfy.model_management as mm
        import folder_paths
        from safetensors.torch import save_file

        mm.load_models_gpu([model], force_patch_weights=True)
        dm = model.model.diffusion_model
        ctx = conditioning[0][0].float().cpu()
        out = {"context": ctx.contiguous()}
        pooled = conditioning[0][1].get("pooled_output")
        if pooled is not None:
            out["pooled"] = pooled.float().cpu().contiguous()
        for n, m in dm.named_modules():
            if n.endswith("attn2"):
                wk = m.to_k.weight.float().cpu()
                wv = m.to_v.weight.float().cpu()
                out[n + ".k"] = (ctx @ wk.T).contiguous()
                out[n + ".v"] = (ctx @ wv.T).contiguous()
        d = os.path.join(folder_paths.get_output_directory(), "probes")
        os.makedirs(d, exist_ok=True)
        save_file(out, os.path.join(d, name + ".safetensors"))
        return {"ui": {"probe": [name]}}


NODE_CLASS_MAPPINGS = {"WeightsmithTestProbe": WeightsmithTestProbe}
