"""CLIP-style tokenizers without the network.

Real checkpoints need the CLIP BPE vocabulary: it is read from a diffusers folder's ``tokenizer/``,
from ``--tokenizer DIR`` or ``WEIGHTSMITH_TOKENIZER``, from folders a host adapter passes in
(ComfyUI's adapter passes its ``comfy/sd1_tokenizer``; core never imports a host), or built from
the CLIP merge list shipped in ``assets/clip_bpe``. Tests and random models use
:func:`build_word_tokenizer`, a real
``transformers.CLIPTokenizer`` whose vocabulary holds every byte plus whole-word merges for a
word list, so common words are one token (as in CLIP) and any text still tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import WeightsmithError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

DEFAULT_WORDS = (
    "a an the of by in on at and with to style art painting photo picture image portrait artwork "
    "van gogh monet picasso rembrandt cat dog car tree house church parachute golf ball fish truck "
    "man woman person red blue green yellow black white small large left right top bottom circle "
    "square triangle cross diamond star stripes background city street mountain river sky sea "
    "bird horse flower garden forest night day sunset beautiful old new young dark bright"
).split()


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def pad_token_for(family: str, comp: str) -> str:
    """The pad token the family declares for encoder ``comp``: OpenCLIP encoders (SD2's ViT-H,
    SDXL's bigG) pad with "!" (id 0), CLIP-L pads with EOS."""
    from . import families

    return families.get(family).component(comp).pad_token or EOS


def fit_tokenizer(tok, family: str, comp: str, *, copy: bool = True):
    """``tok`` with Stable Diffusion's conventions for encoder ``comp`` of ``family``: 77 positions
    (a tokenizer saved without a length says 1e30) and the encoder's pad token. The one place these
    fix-ups live; every host adapter calls it. A copy unless ``copy=False``."""
    import copy as _copy

    from . import families

    tok = _copy.deepcopy(tok) if copy else tok
    if tok.model_max_length > 1000:
        tok.model_max_length = families.get(family).component(comp).max_length or 77
    pad = pad_token_for(family, comp)
    if tok.pad_token != pad:
        tok.pad_token = pad
    return tok


def write_word_vocab(folder: Path, words=DEFAULT_WORDS, model_max_length: int = 77, pad_token: str = EOS) -> Path:
    """Write vocab.json / merges.txt / tokenizer_config.json for a word-level CLIP tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    seen = set(vocab)
    for w in sorted(set(w.lower() for w in words)):
        syms = _apply_bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        while len(syms) > 1:  # append merges that join what BPE left, so the word is one token
            pair = (syms[0], syms[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            syms = [syms[0] + syms[1]] + syms[2:]
            if syms[0] not in seen:
                vocab.append(syms[0])
                seen.add(syms[0])
    vocab += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": model_max_length,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": pad_token,
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
    return folder


def _apply_bpe(syms: list[str], ranks: dict) -> list[str]:
    while len(syms) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(syms, syms[1:]))]
        r, i = min(pairs)
        if r == 1 << 30:
            break
        syms = syms[:i] + [syms[i] + syms[i + 1]] + syms[i + 2 :]
    return syms


@lru_cache(maxsize=8)
def build_word_tokenizer(model_max_length: int = 77, pad_token: str = EOS, words=DEFAULT_WORDS):
    from transformers import CLIPTokenizer

    key = hashlib.sha256(json.dumps([model_max_length, pad_token, list(words)]).encode()).hexdigest()[:16]
    d = _cache_folder(f"word-tokenizer-{key}", lambda f: write_word_vocab(f, words, model_max_length, pad_token))
    return CLIPTokenizer.from_pretrained(str(d), local_files_only=True)


def _cache_folder(name: str, write) -> Path:
    """``<user cache>/weightsmith/<name>``, made once by ``write(folder)`` in a temporary folder beside
    it and renamed into place whole (a reader never sees half a folder; a process that loses the race
    uses the winner's). Where the cache cannot be written, the temporary folder is used instead."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "weightsmith" / name
    if cache.is_dir():
        return cache
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache.parent))
    except OSError:
        tmp = Path(tempfile.mkdtemp(prefix=f"ws-{name}-"))
    write(tmp)
    try:
        os.replace(tmp, cache)
    except OSError:  # another process won the race, or the cache is read-only
        if cache.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            return cache
        return tmp
    return cache


CLIP_BPE = Path(__file__).resolve().parent / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"


def bundled_clip_tokenizer_dir() -> Path:
    """vocab.json/merges.txt of OpenAI's CLIP tokenizer, built from the shipped BPE merge list
    (the same construction as CLIP's SimpleTokenizer), cached in a user cache folder."""
    import gzip

    def write(folder: Path):
        lines = gzip.open(CLIP_BPE, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        (folder / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "model_max_length": 77,
                    "bos_token": BOS,
                    "eos_token": EOS,
                    "unk_token": EOS,
                    "pad_token": EOS,
                    "do_lower_case": True,
                    "tokenizer_class": "CLIPTokenizer",
                }
            )
        )

    return _cache_folder("clip-tokenizer", write)


def _tokenizer_files(folder: Path) -> str | None:
    """Which CLIP tokenizer layout ``folder`` holds: "bpe" (vocab.json + merges.txt), "json" (a
    ``tokenizer.json`` alone, as transformers 5 saves it), or None."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return "bpe"
    if (folder / "tokenizer.json").is_file():
        return "json"
    return None


def load_tokenizer_folder(folder, label: str = "--tokenizer"):
    """The CLIP tokenizer saved in ``folder`` (vocab.json + merges.txt, or transformers 5's
    tokenizer.json alone), or a :class:`WeightsmithError` naming the folder and what it lacks or what
    is broken (docs/reliability.md, "Inputs"). Never falls back to another vocabulary."""
    folder = Path(folder)
    if not folder.exists():
        raise WeightsmithError(
            f"{label} {folder} does not exist; pass a CLIP tokenizer folder (vocab.json + "
            "merges.txt, or tokenizer.json) or leave it out."
        )
    if not folder.is_dir():
        raise WeightsmithError(
            f"{label} {folder} is a file, not a folder; pass the folder that holds vocab.json "
            "and merges.txt (or tokenizer.json), e.g. a diffusers model's tokenizer/ folder."
        )
    kind = _tokenizer_files(folder)
    if kind is None:
        present = sorted(p.name for p in folder.iterdir())[:8]
        raise WeightsmithError(
            f"{label} {folder} holds no CLIP tokenizer: it lacks vocab.json and merges.txt (and has no "
            f"tokenizer.json); it contains {', '.join(present) if present else 'nothing'}. Pass a diffusers "
            "model's tokenizer/ folder or ComfyUI's comfy/sd1_tokenizer."
        )
    try:
        if kind == "bpe":
            from transformers import CLIPTokenizer as cls
        else:
            try:
                from transformers import CLIPTokenizerFast as cls
            except ImportError:  # pragma: no cover - transformers without the alias
                from transformers import CLIPTokenizer as cls
        for name in ("vocab.json",) if kind == "bpe" else ("tokenizer.json",):
            json.loads((folder / name).read_text(encoding="utf-8"))  # damaged JSON: one line below
        tok = cls.from_pretrained(str(folder), local_files_only=True)
    except PermissionError as e:
        raise WeightsmithError(
            f"{label} {folder}: cannot read {Path(e.filename or folder).name} (permission "
            "denied); make it readable for this user."
        ) from None
    except (ValueError, UnicodeDecodeError, OSError, KeyError, TypeError, AttributeError, IndexError) as e:
        what = "vocab.json / merges.txt" if kind == "bpe" else "tokenizer.json"
        raise WeightsmithError(
            f"{label} {folder}: its {what} is damaged or not a CLIP tokenizer "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
            "copy the folder again from the model."
        ) from None
    except Exception as e:  # tokenizers' own parser errors (e.g. a merges list that does not fit)
        raise WeightsmithError(
            f"{label} {folder}: the tokenizer files could not be read "
            f"({type(e).__name__}); copy the folder again from the model."
        ) from None
    if tok.model_max_length > 1000:
        tok.model_max_length = 77
    return tok


def find_clip_tokenizer(explicit: str | os.PathLike | None = None, host_dirs=()):
    """Locate a CLIP BPE tokenizer folder offline, or explain how to provide one.

    An ``explicit`` folder (``--tokenizer``) or ``WEIGHTSMITH_TOKENIZER`` is used or refused with the
    reason (:func:`load_tokenizer_folder`), never skipped. Otherwise looked up in order: ``host_dirs``
    (folders a host adapter knows, e.g. ComfyUI's ``comfy/sd1_tokenizer``), the bundled CLIP merge list."""
    if explicit:
        return load_tokenizer_folder(explicit, "--tokenizer")
    if os.environ.get("WEIGHTSMITH_TOKENIZER"):
        return load_tokenizer_folder(os.environ["WEIGHTSMITH_TOKENIZER"], "WEIGHTSMITH_TOKENIZER")
    candidates = [Path(d) for d in host_dirs]
    if CLIP_BPE.exists():
        candidates.append(bundled_clip_tokenizer_dir())
    for c in candidates:
        if c.is_dir() and _tokenizer_files(c):
            return load_tokenizer_folder(c, "the tokenizer folder")
    raise WeightsmithError(
        "no CLIP tokenizer found for this single-file checkpoint. Pass --tokenizer DIR (a folder with "
        "vocab.json and merges.txt, e.g. the tokenizer/ folder of any diffusers SD model or ComfyUI's "
        "comfy/sd1_tokenizer), or set WEIGHTSMITH_TOKENIZER."
    )


# ----------------------------------------------------------------------------------------------
# T5 (Flux's second text encoder; docs/flux.md, "Tokenizers")
T5_TOKENIZER = Path(__file__).resolve().parent / "assets" / "t5_tokenizer" / "tokenizer.json.gz"
#: T5 tokens the Flux transformer reads: ComfyUI and Forge pad to at least 256 (no attention mask)
T5_LENGTH = 256


def bundled_t5_tokenizer_dir() -> Path:
    """A folder holding the shipped T5 v1.1 ``tokenizer.json`` (decompressed once into the user cache)."""
    import gzip

    def write(folder: Path):
        (folder / "tokenizer.json").write_bytes(gzip.open(T5_TOKENIZER, "rb").read())

    return _cache_folder("t5-tokenizer", write)


def load_t5_tokenizer(folder=None, length: int = T5_LENGTH):
    """Flux's T5 tokenizer (``T5TokenizerFast``): the ``tokenizer.json`` of ``folder`` (a diffusers
    model's ``tokenizer_2/``) when given, else the shipped one. Encoding as the hosts do: no BOS, the
    prompt's tokens, ``</s>``, ``<pad>`` up to ``length`` (``model_max_length``; 256 as ComfyUI and
    Forge, 512 as diffusers' dev default)."""
    from transformers import T5TokenizerFast

    if folder is not None:
        folder = Path(folder)
        f = folder / "tokenizer.json"
        if not f.is_file():
            raise WeightsmithError(
                f"the T5 tokenizer folder {folder} has no tokenizer.json; copy the model's tokenizer_2/ "
                "folder again, or leave it out to use the shipped T5 vocabulary."
            )
        label = str(folder)
    else:
        f = bundled_t5_tokenizer_dir() / "tokenizer.json"
        label = "the shipped T5 vocabulary"
    try:
        tok = T5TokenizerFast(tokenizer_file=str(f), eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    except Exception as e:
        raise WeightsmithError(
            f"{label}: tokenizer.json could not be read ({type(e).__name__}); copy it again from the model."
        ) from None
    if isinstance(length, bool) or not isinstance(length, int) or length < 8:
        raise WeightsmithError(
            f"the T5 token length must be a whole number of at least 8 (256 or 512), got {length!r}."
        )
    tok.model_max_length = length
    return tok
