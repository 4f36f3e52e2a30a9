"""modules.sd_hijack (A1111 v1.10): what ``StableDiffusionModelHijack.hijack`` does to the module tree.

The real hijack replaces every text encoder's ``token_embedding`` by ``EmbeddingsWithFixes`` (it
splices textual-inversion vectors into the embedded tokens), so the weight's live name gains a
``wrapped`` level: ``…embeddings.token_embedding.wrapped.weight`` (SD1, SDXL's CLIP-L),
``model.token_embedding.wrapped.weight`` (SD2, SDXL's bigG). ``hijack`` below does the same to a
stand-in model.
"""

import torch


class EmbeddingsWithFixes(torch.nn.Module):
    """The original embedding under ``.wrapped``; forward looks the tokens up through it (no
    textual-inversion fixes in the stand-in)."""

    def __init__(self, wrapped, embeddings=None, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids):
        return self.wrapped(input_ids)


def _wrap(owner, attr="token_embedding", key="clip_l"):
    emb = getattr(owner, attr)
    if not isinstance(emb, EmbeddingsWithFixes):
        setattr(owner, attr, EmbeddingsWithFixes(emb, None, textual_inversion_key=key))


def hijack(sd_model):
    """Wrap the token embeddings the way A1111 v1.10's hijack does."""
    if getattr(sd_model, "is_sdxl", False):
        for e in sd_model.conditioner.embedders:
            inner = getattr(e, "wrapped", None)
            if inner is None:
                continue
            if hasattr(inner, "transformer"):
                _wrap(inner.transformer.text_model.embeddings)
            elif hasattr(inner, "model"):
                _wrap(inner.model, key="clip_g")
        return
    inner = sd_model.cond_stage_model.wrapped
    if hasattr(inner, "transformer"):
        _wrap(inner.transformer.text_model.embeddings)
    else:
        _wrap(inner.model)
