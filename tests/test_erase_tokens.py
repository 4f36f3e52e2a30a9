"""Token alignment rule of docs/method.md, "Token features and pairing" (core/erase/tokens.py)."""

import pytest

from weightsmith.core.erase.tokens import align
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.tokenizer import build_word_tokenizer

B, E = 1000, 1001  # BOS, EOS ids in the synthetic sequences below


def seq(*ids, T=12, pad=E):
    s = [B, *ids, E]
    return s + [pad] * (T - len(s))


def test_equal_length_concepts_pair_one_to_one_and_suffix_left_aligned():
    # "photo of X1 X2 at night" vs "photo of Y1 Y2 at night"
    t = seq(5, 6, 70, 71, 8, 9)
    a = seq(5, 6, 80, 81, 8, 9)
    p = align(t, a, E, B)
    # prefix BOS, 5, 6 skipped; concept 3,4 -> 3,4; suffix 5.. -> 5..
    assert p.target_pos == tuple(range(3, 12))
    assert p.anchor_pos == tuple(range(3, 12))


def test_longer_target_maps_proportionally_and_truncates_tail():
    t = seq(5, 70, 71, 72, 9)  # concept of 3 tokens at 2..4, suffix from 5
    a = seq(5, 80, 9)  # concept of 1 token at 2, suffix from 3
    p = align(t, a, E, B)
    assert p.target_pos[:3] == (2, 3, 4)
    assert p.anchor_pos[:3] == (2, 2, 2)
    # suffix: target 5.. pairs with anchor 3.., length T - max(5, 3) = 7
    assert p.target_pos[3:] == tuple(range(5, 12))
    assert p.anchor_pos[3:] == tuple(range(3, 10))


def test_empty_anchor_maps_onto_first_post_concept_token():
    t = seq(5, 70, 71)  # "photo of X1 X2"
    a = seq(5)  # "photo of"
    p = align(t, a, E, B)
    assert p.target_pos[:2] == (2, 3) and p.anchor_pos[:2] == (2, 2)  # anchor pos 2 is its EOS
    assert p.target_pos[2] == 4 and p.anchor_pos[2] == 2  # EOS <-> EOS


def test_last_mode_and_max_pad():
    t = seq(5, 70, 71, 9)
    a = seq(5, 80, 9)
    assert align(t, a, E, B, mode="last") == align(t, a, E, B, mode="last")
    last = align(t, a, E, B, mode="last")
    assert last.target_pos == (3,) and last.anchor_pos == (2,)
    capped = align(t, a, E, B, max_pad=1)
    # concept (2) + suffix "9", EOS (2) + 1 padding row
    assert len(capped.target_pos) == 2 + 2 + 1
    assert capped.target_pos[-1] == 6 and capped.anchor_pos[-1] == 5


def test_identical_prompts_give_no_pairs_and_bad_mode_is_refused():
    t = seq(5, 70)
    assert align(t, list(t), E, B).target_pos == ()
    with pytest.raises(WeightsmithError, match="token mode"):
        align(t, t, E, B, mode="middle")


def test_real_tokenizer_prompt_pair():
    tok = build_word_tokenizer()
    t = tok("a photo of van gogh at night", padding="max_length", max_length=20).input_ids
    a = tok("a photo of art at night", padding="max_length", max_length=20).input_ids
    p = align(t, a, tok.eos_token_id, tok.bos_token_id)
    words_t = tok.convert_ids_to_tokens([t[i] for i in p.target_pos[:4]])
    words_a = tok.convert_ids_to_tokens([a[i] for i in p.anchor_pos[:4]])
    assert words_t[:2] == ["van</w>", "gogh</w>"] and words_a[:2] == ["art</w>", "art</w>"]
    assert words_t[2:4] == words_a[2:4] == ["at</w>", "night</w>"]


def test_bundled_clip_vocabulary_gives_openai_clip_ids(tmp_path, monkeypatch):
    from weightsmith.core.tokenizer import find_clip_tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("WEIGHTSMITH_TOKENIZER", raising=False)
    tok = find_clip_tokenizer()
    # ids of OpenAI's CLIP tokenizer (openai/clip-vit-large-patch14) for this text
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77


def test_word_tokenizer_folder_is_cached_once_not_left_in_tmp(tmp_path, monkeypatch):
    """Random models build their tokenizer folder in the user cache, keyed by its contents: building it
    again (a new process) reuses it and nothing is left behind in the temporary folder."""
    import tempfile
    from pathlib import Path

    from weightsmith.core.tokenizer import write_word_vocab

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    build_word_tokenizer.cache_clear()
    try:
        a = build_word_tokenizer(77, "!")
        build_word_tokenizer.cache_clear()
        b = build_word_tokenizer(77, "!")
        c = build_word_tokenizer(64)
    finally:
        build_word_tokenizer.cache_clear()
    assert a.name_or_path == b.name_or_path != c.name_or_path
    assert sorted(p.name for p in (tmp_path / "cache" / "weightsmith").iterdir()) == sorted(
        {Path(t.name_or_path).name for t in (a, c)}
    )
    assert list(tmp.iterdir()) == []
    ref = write_word_vocab(tmp_path / "ref", model_max_length=77, pad_token="!")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (ref / f).read_bytes() == (Path(a.name_or_path) / f).read_bytes()
    text = "a red circle on the left, van gogh style"
    assert a(text).input_ids == b(text).input_ids
