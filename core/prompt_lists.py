"""Concept and prompt lists typed as text: the one splitting rule of every front end
(docs/method.md, "Lists in text fields"; tests/test_prompt_lists.py states it with examples).

The rule, everywhere:

- a **line break** and a **semicolon** ``;`` separate items; each item is stripped of surrounding
  spaces and empty items are dropped;
- a **comma is part of the item** (``a cat, in a hat``, ``Smith, John``), because prompts and many
  concept names contain commas;
- a separator **inside double quotes** does not separate (``"AT&T; Inc."``), and an item wholly
  enclosed in double quotes loses them; a quote inside an item is kept as typed.

Per front end, for the same intended list the same items come out:

- **ComfyUI** (node text boxes): the rule as it is. Concepts and sample prompts alike.
- **CLI** (repeatable ``--target`` / ``--anchor`` / ``--preserve``, ``--prompts 'p1; p2'``): every
  value is split by the rule; a value with no item at all stays one empty item (``--anchor ""`` is
  the unconditional prompt, and keeps its place among other anchors).
- **A1111 / Forge tab**: *concept* boxes (Targets, Anchors, Preserve) and the Weights box also
  split at commas outside quotes, as the tab has always documented (``Monet, Picasso``; A1111
  users write comma lists) — write ``"Smith, John"`` for a name with a comma. *Sample prompts* are a
  table: one line per LoRA (or one line for all), several prompts on a line separated by ``;`` or
  ``|`` (the tab's older separator); commas stay inside prompts.
"""

from __future__ import annotations

SEPARATORS = ("\n", ";")
QUOTE = '"'
A1111_PROMPT_SEPARATORS = (";", "|")


def _split_line(line: str, seps: tuple[str, ...]) -> list[str]:
    parts, cur, quoted = [], [], False
    for ch in line:
        if ch == QUOTE:
            quoted = not quoted
        if ch in seps and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _item(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == QUOTE and s[-1] == QUOTE:
        s = s[1:-1].strip()
    return s


def split_items(text, *, commas: bool = False, separators: tuple[str, ...] = (";",)) -> list[str]:
    """The items of ``text`` by the rule above: lines, then ``separators`` (``;``) outside double
    quotes, and commas too when ``commas``. A list or tuple is taken as already split (each entry
    stripped, empty ones dropped)."""
    if isinstance(text, (list, tuple)):
        return [s for s in (_item(str(t)) for t in text) if s]
    seps = tuple(separators) + ((",",) if commas else ())
    out = []
    for line in str(text or "").splitlines():
        out += [s for s in (_item(p) for p in _split_line(line, seps)) if s]
    return out


def comfy_list(text) -> list[str]:
    """A ComfyUI node's concept or prompt box: one item per line, ``;`` also separates."""
    return split_items(text)


def cli_list(values) -> list[str]:
    """The values of a repeatable CLI flag: each split by the rule; an empty value stays one empty item."""
    out = []
    for v in values or []:
        out += split_items(v) or [""]
    return out


def a1111_list(text) -> list[str]:
    """An A1111 / Forge tab concept or Weights box: lines, ``;`` and commas outside double quotes."""
    return split_items(text, commas=True)


def a1111_prompt_table(text) -> list[list[str]]:
    """The tab's Sample prompts box: one list of prompts per non-empty line (prompts on a line separated
    by ``;`` or ``|``; commas stay in the prompt)."""
    rows = []
    for line in str(text or "").splitlines():
        row = split_items(line, separators=A1111_PROMPT_SEPARATORS)
        if row:
            rows.append(row)
    return rows
