"""The in-memory Flux.1 model the Flux solvers work on (docs/flux.md, "How Weightsmith holds a Flux model").

A :class:`FluxModel` keeps every component where it is stored and reads what a solver asks for:

- the **transformer** stays in its file (BFL, ComfyUI all-in-one or diffusers shards): erasure reads
  only its two text-input projections, ``context_embedder`` (BFL ``txt_in``) and
  ``time_text_embed.text_embedder.linear_1`` (``vector_in.in_layer``), one tensor at a time, in float32
  from whatever the file stores (bf16, fp16, fp8, ComfyUI's scaled fp8);
- **T5** (:class:`T5Encoder`) runs layer by layer: block ``i`` is built in float32 from the file when
  it is needed and dropped after, so T5-XXL (4.8 B parameters) never exists in float32 as a whole;
- **CLIP-L** is small (123 M parameters) and is held as a ``CLIPTextModel`` in float32; Flux reads only
  its pooled output (the EOS token after the final LayerNorm, no projection).

Conditioning as the hosts build it: T5 ``last_hidden_state`` over ``<prompt> </s> <pad>…`` padded to
256 tokens (ComfyUI, Forge; 512 optional), no attention mask; CLIP-L pooled over 77 tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import WeightsmithError, require
from .layouts.flux import CLIP_L, T5, TEXT_INPUTS, TRANSFORMER, load_params, read_weight, transformer_key

FAMILY = "flux"
#: T5 sub-layers by the input they read (the order a block computes them): ErasePro's T5 stage edits
#: the named ones; CLIP-style names (``--te-sublayers``) map onto them
T5_SUBLAYERS = {
    "q": "layer.0.SelfAttention.q",
    "k": "layer.0.SelfAttention.k",
    "v": "layer.0.SelfAttention.v",
    "o": "layer.0.SelfAttention.o",
    "wi_0": "layer.1.DenseReluDense.wi_0",
    "wi_1": "layer.1.DenseReluDense.wi_1",
    "wo": "layer.1.DenseReluDense.wo",
}


@dataclass
class Part:
    """Where one component's weights are stored: a lazy state (:mod:`.state_files`), the key prefix
    inside it, the key layout (``bfl`` / ``diffusers`` for the transformer, ``hf`` for the text
    encoders), the file or folder, and how it came (``file``: a file of its own, ``checkpoint``: inside
    an all-in-one checkpoint, ``folder``: a diffusers folder's component)."""

    state: object
    prefix: str
    layout: str
    path: Path | None
    container: str


class T5Encoder:
    """A T5 encoder read from its file one block at a time (docs/flux.md, "How Weightsmith holds a Flux model")."""

    def __init__(self, part: Part, config, keep_blocks: bool | None = None):
        self.part, self.config = part, config
        n_params = config.num_layers * (
            4 * config.d_model * config.num_heads * config.d_kv + 3 * config.d_model * config.d_ff
        )
        # small encoders (tests) keep their built blocks; T5-XXL (0.8 GB per float32 block) does not
        self.keep_blocks = n_params < 50_000_000 if keep_blocks is None else keep_blocks
        self._blocks: dict[int, torch.nn.Module] = {}
        self._emb = None
        self._norm = None

    @property
    def n_layers(self) -> int:
        return self.config.num_layers

    def _key(self, rest: str) -> str:
        return self.part.prefix + rest

    def embedding_weight(self) -> torch.Tensor:
        if self._emb is None:
            ks = set(self.part.state.keys())
            k = next(self._key(n) for n in ("shared.weight", "encoder.embed_tokens.weight") if self._key(n) in ks)
            self._emb = read_weight(self.part.state, k)
        return self._emb

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.embedding_weight())

    def weight(self, i: int, sub: str) -> torch.Tensor:
        """The stored weight of block ``i``'s sub-layer (a :data:`T5_SUBLAYERS` path), float32."""
        return read_weight(self.part.state, self._key(f"encoder.block.{i}.{sub}.weight"))

    def block_param(self, i: int, name: str) -> torch.Tensor:
        """A parameter of block ``i`` by its path inside the block, float32."""
        return read_weight(self.part.state, self._key(f"encoder.block.{i}.{name}"))

    def meta_block(self, i: int) -> torch.nn.Module:
        """Block ``i`` as a transformers ``T5Block`` on the ``meta`` device (no weights yet)."""
        from transformers.models.t5.modeling_t5 import T5Block

        require(0 <= i < self.n_layers, f"T5 has no block {i}.")
        with torch.device("meta"):
            blk = T5Block(self.config, has_relative_attention_bias=(i == 0), layer_idx=i)
        return blk.eval().requires_grad_(False)

    def block(self, i: int) -> torch.nn.Module:
        """Block ``i`` as a transformers ``T5Block`` in float32, its weights read from the file."""
        if i in self._blocks:
            return self._blocks[i]
        blk = self.meta_block(i)

        def read(name):
            try:
                return self.block_param(i, name)
            except KeyError:
                key = self._key(f"encoder.block.{i}.{name}")
                raise WeightsmithError(f"the T5 text encoder lacks {key}; the file is damaged or incomplete.") from None

        load_params(blk, read, self._key(f"encoder.block.{i}"))
        if self.keep_blocks:
            self._blocks[i] = blk
        return blk

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        if self._norm is None:
            from transformers.models.t5.modeling_t5 import T5LayerNorm

            norm = T5LayerNorm(self.config.d_model, eps=self.config.layer_norm_epsilon)
            norm.weight.data = read_weight(self.part.state, self._key("encoder.final_layer_norm.weight"))
            self._norm = norm.eval().requires_grad_(False)
        with torch.no_grad():
            return self._norm(h)

    @staticmethod
    def run_block(block, h: torch.Tensor, bias):
        """One block on ``h`` (no attention mask, as Flux runs T5); returns (h, position bias)."""
        with torch.no_grad():
            out = block(h, None, bias)
        return out[0], out[1]

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, blocks: dict | None = None) -> torch.Tensor:
        """``last_hidden_state`` for token ids [B, L], layer by layer; ``blocks``: replacements for some
        block indices (an edited copy)."""
        h, bias = self.embed(ids), None
        for i in range(self.n_layers):
            blk = (blocks or {}).get(i)
            blk = self.block(i) if blk is None else blk
            h, bias = self.run_block(blk, h, bias)
        return self.final_norm(h)


@dataclass
class FluxModel:
    """A Flux.1 model: parts where stored, CLIP-L held, T5 layer-wise, tokenizers (docs/flux.md)."""

    variant: str  # "dev" | "schnell"
    parts: dict[str, Part]
    clip: torch.nn.Module | None
    t5: T5Encoder | None
    tokenizers: dict[str, object]
    source: object | None = None  # flux_io.FluxSource
    family: str = FAMILY
    unet_config: dict = field(default_factory=dict)  # Edit's field; Flux has no UNet
    sample_dtype: torch.dtype = torch.float32  # the precision IterIS samples in (tests: float64)
    _weights: dict = field(default_factory=dict, repr=False)
    _keysets: dict = field(default_factory=dict, repr=False)  # id(part.state) -> its keys
    _widths: dict = field(default_factory=dict, repr=False)  # id(part.state) -> BFL (hidden, MLP width)

    @property
    def text_encoders(self) -> dict:
        """The text encoders present (component -> module or layer-wise encoder)."""
        out = {}
        if self.clip is not None:
            out[CLIP_L] = self.clip
        if self.t5 is not None:
            out[T5] = self.t5
        return out

    def require_text_encoders(self, what: str) -> None:
        missing = [label for c, label in ((CLIP_L, "CLIP-L"), (T5, "T5-XXL")) if c not in self.text_encoders]
        if missing:
            raise WeightsmithError(
                f"{what} needs Flux's text encoders, but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing: the model file holds only the transformer. "
                "Pass each text-encoder file with --text-encoder (e.g. --text-encoder clip_l.safetensors "
                "--text-encoder t5xxl_fp16.safetensors), as ComfyUI's DualCLIPLoader takes them."
            )

    def sampling_model(self, names):
        """The model IterIS and RegMean sample, for the modules ``names`` the LoRAs adapt
        (:class:`~weightsmith.core.flux_sampling.FluxSampling`)."""
        from .flux_sampling import FluxSampling

        return FluxSampling(self, names, self.sample_dtype)

    # -- weights ------------------------------------------------------------------------------
    def weight_key(self, canonical: str) -> tuple[Part, str]:
        """(part, stored key) of a canonical module's weight."""
        comp, _, path = canonical.partition(".")
        part = self.parts.get(comp)
        require(part is not None, f"this Flux model has no {comp}; {canonical} cannot be read.")
        if comp == TRANSFORMER:
            return part, transformer_key(path, part.layout, part.prefix)
        if comp == CLIP_L:  # the part's prefix ends where the module paths start (text_model. included)
            path = path.removeprefix("text_model.")
        return part, part.prefix + path + ".weight"

    def weight(self, canonical: str) -> torch.Tensor:
        """The float32 weight of any linear module (canonical name; a fused BFL tensor's rows, ``norm_out``
        in diffusers' row order), read from its file; the text inputs the solvers read are cached."""
        from .layouts.flux_names import take_piece

        if canonical in self._weights:
            return self._weights[canonical]
        comp, _, path = canonical.partition(".")
        if comp == CLIP_L and self.clip is not None:
            return self._clip_module(path).weight.detach().float()
        try:
            part, key, piece = self.stored_piece(canonical)
        except KeyError:
            raise WeightsmithError(f"the model lacks {canonical}; the file is damaged or not this model.") from None
        w = take_piece(read_weight(part.state, key), piece)
        if comp == TRANSFORMER and path in TEXT_INPUTS:
            self._weights[canonical] = w
        return w

    def stored_piece(self, canonical: str):
        """Where any linear module of the model is stored: ``(part, weight key, piece)``, ``piece`` a
        :class:`~weightsmith.core.layouts.flux_names.Piece` (its rows in a fused BFL tensor, or the
        ``norm_out`` half swap) or None where the key holds the module as it is. KeyError where the model
        has no such module."""
        from .layouts import flux_names

        comp, _, path = canonical.partition(".")
        part = self.parts.get(comp)
        if part is None:
            raise KeyError(canonical)
        if comp != TRANSFORMER or part.layout != "bfl":
            key = part.prefix + (path.removeprefix("text_model.") if comp == CLIP_L else path) + ".weight"
            if key not in self._keys(part):
                raise KeyError(canonical)
            return part, key, None
        widths = self._bfl_widths(part)
        if widths is None:
            raise KeyError(canonical)
        bfl, piece = flux_names.diffusers_to_bfl(path, *widths)  # KeyError: no such module
        key = part.prefix + bfl + ".weight"
        if key not in self._keys(part):
            raise KeyError(canonical)
        return part, key, (piece if piece.rows is not None or piece.swap else None)

    def transformer_param(self, param: str, dtype=torch.float32) -> torch.Tensor:
        """Any transformer parameter by its diffusers path (``transformer_blocks.0.attn.to_q.weight``,
        ``….bias``, ``….norm_q.weight``), read from the file in ``dtype``: rows of a fused BFL tensor,
        ``norm_out``'s halves swapped back, ComfyUI's fp8 scaled."""
        from .layouts.flux_names import bfl_param, take_piece

        part, piece = self.parts[TRANSFORMER], None
        if part.layout != "bfl":
            key = part.prefix + param
        else:
            bfl, piece = bfl_param(param, *self._bfl_widths(part))
            key = part.prefix + bfl
        if key not in self._keys(part):
            raise WeightsmithError(f"the Flux transformer lacks {key}; the file is damaged or incomplete.")
        return take_piece(read_weight(part.state, key), piece).to(dtype).contiguous()

    def _bfl_widths(self, part: Part):
        """``(hidden, MLP width)`` of a BFL-named transformer part (:func:`~.layouts.flux_names.bfl_widths`),
        read once from its header."""
        from .layouts.flux_names import bfl_widths

        k = id(part.state)
        if k not in self._widths:
            keys = self._keys(part)
            self._widths[k] = bfl_widths(lambda key: part.state.shape(key) if key in keys else None, part.prefix)
        return self._widths[k]

    def weight_shape(self, canonical: str) -> tuple | None:
        """The (out, in) shape of any linear module of the model (canonical name), read from the file's
        header; ``None`` where the model has no such module (a LoRA for another model is refused on it,
        docs/flux_lora.md)."""
        comp, _, path = canonical.partition(".")
        if comp == CLIP_L and self.clip is not None:
            try:
                return tuple(self._clip_module(path).weight.shape)
            except AttributeError:
                return None
        try:
            part, key, piece = self.stored_piece(canonical)
        except KeyError:
            return None
        full = tuple(part.state.shape(key))
        return full if piece is None or piece.rows is None else (piece.length, *full[1:])

    def _clip_module(self, path: str) -> torch.nn.Module:
        """A CLIP-L submodule by its canonical path (``text_model.…``; transformers 5 has no ``text_model``)."""
        try:
            return self.clip.get_submodule(path)
        except AttributeError:
            return self.clip.get_submodule(path.removeprefix("text_model."))

    def _keys(self, part: Part) -> set:
        got = self._keysets.get(id(part.state))
        if got is None:
            got = self._keysets[id(part.state)] = set(part.state.keys())
        return got

    def bias(self, canonical: str) -> torch.Tensor | None:
        comp, _, path = canonical.partition(".")
        if comp != TRANSFORMER:
            return None
        part, key = self.weight_key(canonical)
        bkey = key.removesuffix(".weight") + ".bias"
        return read_weight(part.state, bkey) if bkey in set(part.state.keys()) else None

    @staticmethod
    def text_input_names() -> list[str]:
        """The transformer's text-only input projections (canonical), T5 side first."""
        return [f"{TRANSFORMER}.{m}" for m in TEXT_INPUTS]

    def t5_name(self, i: int, sub: str) -> str:
        return f"{T5}.encoder.block.{i}.{T5_SUBLAYERS[sub]}"

    # -- text -----------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str], comp: str) -> torch.Tensor:
        tok = self.tokenizers[comp]
        return tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def clip_pooled(self, prompts: list[str]) -> torch.Tensor:
        """CLIP-L's pooled output [B, 768] (EOS after the final LayerNorm, no projection), float32."""
        self.require_text_encoders("encoding a prompt")
        return self.clip(input_ids=self.tokenize(prompts, CLIP_L)).pooler_output.float()

    @torch.no_grad()
    def t5_hidden(self, prompts: list[str]) -> torch.Tensor:
        """T5's ``last_hidden_state`` [B, L, d] over the padded prompts, float32."""
        self.require_text_encoders("encoding a prompt")
        return self.t5.encode(self.tokenize(prompts, T5))

    def check_prompt_length(self, prompts: list[str], warn: Callable[[str], None]) -> None:
        """Warn when a prompt is longer than T5's token length (it is truncated)."""
        tok = self.tokenizers.get(T5)
        if tok is None:
            return
        for p in prompts:
            n = len(tok(p, truncation=False).input_ids)
            if n > tok.model_max_length:
                warn(
                    f"prompt is {n} T5 tokens, longer than the {tok.model_max_length}-token length; it was "
                    f"truncated: {p[:60]!r}..."
                )
