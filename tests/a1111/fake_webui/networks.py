"""Stand-in for A1111 v1.10's built-in Lora extension (extensions-builtin/Lora/networks.py):
layer naming, kohya key resolution and the per-layer backup/restore/apply cycle."""

import re

import torch
from modules import shared

loaded_networks = []
re_digits = re.compile(r"\d+")
re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")
suffix_conversion = {
    "attentions": {},
    "resnets": {
        "conv1": "in_layers_2",
        "conv2": "out_layers_3",
        "norm1": "in_layers_0",
        "norm2": "out_layers_0",
        "time_emb_proj": "emb_layers_1",
        "conv_shortcut": "skip_connection",
    },
}


class Network:
    def __init__(self, name):
        self.name = name
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}


class NetworkModule:
    """network_lora.NetworkModuleLora / network_full.NetworkModuleFull."""

    def __init__(self, net, sd_key, w):
        self.network, self.sd_key = net, sd_key
        self.diff = w.get("diff")
        self.up, self.down = w.get("lora_up.weight"), w.get("lora_down.weight")
        self.alpha = float(w["alpha"]) if "alpha" in w else None
        self.dim = self.down.shape[0] if self.down is not None else None

    def multiplier(self):
        if "transformer" in self.sd_key[:20]:
            return self.network.te_multiplier
        return self.network.unet_multiplier

    def calc_scale(self):
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def calc_updown(self, orig_weight):
        if self.diff is not None:
            updown = self.diff.to(orig_weight.device, orig_weight.dtype)
        else:
            up = self.up.to(orig_weight.device, orig_weight.dtype)
            down = self.down.to(orig_weight.device, orig_weight.dtype)
            updown = up.flatten(1) @ down.flatten(1)
        if orig_weight.numel() == updown.numel():
            updown = updown.reshape(orig_weight.shape)
        return updown * self.calc_scale() * self.multiplier(), None


def convert_diffusers_name_to_compvis(key, is_sd2):
    def match(m, regex):
        r = re.match(regex, key)
        if not r:
            return False
        m.clear()
        m.extend([int(x) if re.match(re_digits, x) else x for x in r.groups()])
        return True

    m = []
    if match(m, r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if match(m, r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if match(m, r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if match(m, r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if match(m, r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if match(m, r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if match(m, r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            if "mlp_fc1" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
            elif "mlp_fc2" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
            else:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if match(m, r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        elif "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        else:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


def assign_network_names_to_compvis_modules(sd_model):
    mapping = {}
    if getattr(sd_model, "is_sdxl", False):
        for i, embedder in enumerate(sd_model.conditioner.embedders):
            if not hasattr(embedder, "wrapped"):
                continue
            for name, module in embedder.wrapped.named_modules():
                nn = f"{i}_{name.replace('.', '_')}"
                mapping[nn] = module
                module.network_layer_name = nn
    else:
        csm = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
        for name, module in csm.named_modules():
            nn = name.replace(".", "_")
            mapping[nn] = module
            module.network_layer_name = nn
    for name, module in sd_model.model.named_modules():
        nn = name.replace(".", "_")
        mapping[nn] = module
        module.network_layer_name = nn
    sd_model.network_layer_mapping = mapping


def load_network(name, sd):
    """Resolve a kohya state dict against shared.sd_model. Returns (Network, unmatched keys)."""
    sm = shared.sd_model
    if not hasattr(sm, "network_layer_mapping"):
        assign_network_names_to_compvis_modules(sm)
    mapping = sm.network_layer_mapping
    is_sd2 = "model_transformer_resblocks" in mapping
    net = Network(name)
    matched, failed = {}, {}
    for key_network, weight in sd.items():
        base, _, part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(base, is_sd2)
        mod = mapping.get(key)
        if mod is None:
            m = re_x_proj.match(key)
            if m:
                mod = mapping.get(m.group(1))
        if mod is None and "lora_unet" in base:
            key = base.replace("lora_unet", "diffusion_model")
            mod = mapping.get(key)
        elif mod is None and "lora_te1_text_model" in base:
            key = base.replace("lora_te1_text_model", "0_transformer_text_model")
            mod = mapping.get(key)
            if mod is None:
                key = base.replace("lora_te1_text_model", "transformer_text_model")
                mod = mapping.get(key)
        if mod is None:
            failed[key_network] = key
            continue
        matched.setdefault(key, {})[part] = weight
    for key, w in matched.items():
        net.modules[key] = NetworkModule(net, key, w)
    return net, failed


def network_restore_weights_from_backup(self):
    wb = getattr(self, "network_weights_backup", None)
    bb = getattr(self, "network_bias_backup", None)
    if wb is None and bb is None:
        return
    with torch.no_grad():
        if wb is not None:
            if isinstance(self, torch.nn.MultiheadAttention):
                self.in_proj_weight.copy_(wb[0])
                self.out_proj.weight.copy_(wb[1])
            else:
                self.weight.copy_(wb)
        target = self.out_proj if isinstance(self, torch.nn.MultiheadAttention) else self
        if bb is None:
            target.bias = None
        else:
            target.bias.copy_(bb)


def network_apply_weights(self):
    layer = getattr(self, "network_layer_name", None)
    if layer is None:
        return
    current = getattr(self, "network_current_names", ())
    wanted = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    wb = getattr(self, "network_weights_backup", None)
    if wb is None and wanted != ():
        if current != ():
            raise RuntimeError(f"{layer} - no backup weights found and current weights are not unchanged")
        if isinstance(self, torch.nn.MultiheadAttention):
            wb = (self.in_proj_weight.to("cpu", copy=True), self.out_proj.weight.to("cpu", copy=True))
        else:
            wb = self.weight.to("cpu", copy=True)
        self.network_weights_backup = wb
    bb = getattr(self, "network_bias_backup", None)
    if bb is None and wanted != ():
        if isinstance(self, torch.nn.MultiheadAttention) and self.out_proj.bias is not None:
            bb = self.out_proj.bias.to("cpu", copy=True)
        elif getattr(self, "bias", None) is not None:
            bb = self.bias.to("cpu", copy=True)
        else:
            bb = None
        if bb is not None and current != ():
            raise RuntimeError("no backup bias found and current bias are not unchanged")
        self.network_bias_backup = bb
    if current != wanted:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            module = net.modules.get(layer)
            if module is not None and hasattr(self, "weight"):
                with torch.no_grad():
                    updown, _ = module.calc_updown(self.weight)
                    self.weight.copy_((self.weight.to(updown.dtype) + updown).to(self.weight.dtype))
                continue
            mq, mk, mv, mo = (net.modules.get(layer + s) for s in ("_q_proj", "_k_proj", "_v_proj", "_out_proj"))
            if isinstance(self, torch.nn.MultiheadAttention) and mq and mk and mv and mo:
                with torch.no_grad():
                    qw, kw, vw = self.in_proj_weight.chunk(3, 0)
                    upd = torch.vstack([mq.calc_updown(qw)[0], mk.calc_updown(kw)[0], mv.calc_updown(vw)[0]])
                    self.in_proj_weight += upd
                    self.out_proj.weight += mo.calc_updown(self.out_proj.weight)[0]
                continue
        self.network_current_names = wanted


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def generate():
    """What a generation does to the weights: every patched layer's forward calls
    network_apply_weights(self) first (lora_patches)."""
    sm = shared.sd_model
    if not hasattr(sm, "network_layer_mapping"):
        assign_network_names_to_compvis_modules(sm)
    # an nn.MultiheadAttention computes with out_proj.weight directly; out_proj.forward never runs
    seen = {id(m.out_proj) for m in sm.network_layer_mapping.values() if isinstance(m, torch.nn.MultiheadAttention)}
    for m in sm.network_layer_mapping.values():
        if id(m) in seen or not isinstance(
            m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
        ):
            continue
        seen.add(id(m))
        network_apply_weights(m)


def list_available_networks():
    pass
