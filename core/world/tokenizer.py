"""Small CLIP-style BPE vocabulary for the tiny default model.

The tokenizer is a stock ``transformers.CLIPTokenizer``; only its ``vocab.json`` /
``merges.txt`` are ours. Like OpenAI CLIP's, the vocabulary holds the 256 byte symbols (with
and without the ``</w>`` end-of-word marker), the BPE merges and ``<|startoftext|>`` /
``<|endoftext|>`` (BOS / EOS; EOS is also the padding token, as in SD 1.x). The merges are
learnt here by plain BPE on the words of :func:`render.prompt_corpus`, so every world word is
one token and any other text still tokenizes (byte fallback).

``build_tokenizer_files(out_dir)`` writes the files; the shipped copy is in
``assets/tiny-sd/tokenizer/``. The shipped World v2 model uses ``MODEL_MAX_LENGTH_V2`` = 77 as Stable
Diffusion does, so a prompt's conditioning has SD's shape (BOS, the words, EOS, then EOS padding to 77
positions); ``MODEL_MAX_LENGTH`` = 32 is the first world's recipe (``train_model --world v1``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..tokenizer import BOS, EOS, bytes_to_unicode  # noqa: F401  (shared with core's CLIP tokenizer)
from .render import prompt_corpus

MODEL_MAX_LENGTH = 32
#: context length of the World v2 recipe (Stable Diffusion's)
MODEL_MAX_LENGTH_V2 = 77


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE until every word is a single symbol."""
    segs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for s in segs.values():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # deterministic tie-break
        merges.append(best)
        a, b = best
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = tuple(out)


def build_tokenizer_files(
    out_dir: str | Path, words: list[str] | None = None, model_max_length: int = MODEL_MAX_LENGTH
) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = sorted(set(words or prompt_corpus()))
    merges = learn_merges(words)
    byte_syms = list(bytes_to_unicode().values())
    vocab_list = byte_syms + [s + "</w>" for s in byte_syms]
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            vocab_list.append(a + b)
            seen.add(a + b)
    vocab_list += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2), encoding="utf-8"
    )
    return out


def load_tokenizer(path: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))
