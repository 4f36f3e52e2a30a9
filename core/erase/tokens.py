"""Which token positions become edit features, and how target tokens pair with anchor tokens.

docs/method.md, "Token features and pairing" (UCE's token modes included). The rule, written
down once:

Given a target prompt and the anchor prompt made from the same template (padded to the context
length T), let ``s`` be the length of their common token prefix and ``q`` the length of their
common run of real tokens before and including EOS (the template's suffix). Then

- the **prefix** ``[0, s)`` is identical in both prompts; a causal text encoder gives identical
  features there, so it carries no constraint and is skipped;
- the **concept span** is ``[s, ct)`` in the target and ``[s, ca)`` in the anchor
  (``ct = eos_t + 1 - q``, ``ca = eos_a + 1 - q``). Target concept token ``k`` (0-based, of ``nt``)
  pairs with anchor concept token ``floor(k * na / nt)``; an empty anchor concept (``na = 0``,
  e.g. the anchor ``""``) pairs every target concept token with the anchor's first post-concept
  token ``ca``;
- the **suffix** (template words after the concept, EOS and padding) pairs left-aligned from
  the concept's end: ``(ct + i, ca + i)`` for ``i < T - max(ct, ca)``. Both sides keep the same
  number of rows, the tail beyond the shorter one is dropped (as UCE's older script does).
  ``max_pad`` limits how many padding positions after EOS are kept.

Mode ``"last"`` (UCE's current script): one pair per prompt, the last target concept token with
the last anchor concept token (the anchor's EOS when the anchor concept is empty).

Preserve prompts contribute every position (all T tokens), as UCE does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import WeightsmithError
from .options import TOKEN_MODES


@dataclass(frozen=True)
class Pairing:
    target_pos: tuple[int, ...]
    anchor_pos: tuple[int, ...]


def _eos_index(ids: list[int], eos_id: int, bos_id: int | None) -> int:
    start = 1 if (bos_id is not None and ids and ids[0] == bos_id) else 0
    for i in range(start, len(ids)):
        if ids[i] == eos_id:
            return i
    return len(ids) - 1


def align(
    target_ids: list[int],
    anchor_ids: list[int],
    eos_id: int,
    bos_id: int | None = None,
    mode: str = "suffix",
    max_pad: int | None = None,
) -> Pairing:
    """Positions of paired target/anchor features for one prompt pair (see module docstring)."""
    if mode not in TOKEN_MODES:
        raise WeightsmithError(f"unknown token mode {mode!r}; use one of {', '.join(TOKEN_MODES)}.")
    T = len(target_ids)
    if len(anchor_ids) != T:
        raise ValueError("target and anchor ids must be padded to the same length")
    et = _eos_index(target_ids, eos_id, bos_id)
    ea = _eos_index(anchor_ids, eos_id, bos_id)
    s = 0
    while s < min(et, ea) and target_ids[s] == anchor_ids[s]:
        s += 1
    q = 0
    while et - q >= s and ea - q >= s and target_ids[et - q] == anchor_ids[ea - q]:
        q += 1
    ct, ca = et + 1 - q, ea + 1 - q
    nt, na = ct - s, ca - s
    if nt <= 0:
        return Pairing((), ())  # target concept is empty or identical to the anchor
    if mode == "last":
        return Pairing((ct - 1,), ((ca - 1) if na > 0 else ca,))
    tp, ap = [], []
    for k in range(nt):
        tp.append(s + k)
        ap.append(s + (k * na) // nt if na > 0 else ca)
    L = T - max(ct, ca)
    if max_pad is not None:
        # suffix rows up to and including EOS, plus at most max_pad padding rows
        L = min(L, (et + 1 - ct) + max_pad)
    for i in range(L):
        tp.append(ct + i)
        ap.append(ca + i)
    return Pairing(tuple(tp), tuple(ap))
