"""How an option is declared once and read by every front end (CLI, ComfyUI nodes, A1111 tab).

Options are dataclass fields declared with :func:`option`: the default, the help text, the
range and the CLI flag live in the field's metadata, next to the value. Front ends never restate
a default; they ask :func:`spec` (``spec(EraseOptions, "lam").default``) and build options from
host values with :func:`from_values`, which refuses a key the options do not have (a renamed
field becomes an error, not a silently ignored input). The declaration is also the rule:
:func:`check_declared` (called first by every options class's ``validate()``) refuses a value of
the wrong type or outside its declared range or choices, with one sentence naming the option and
its CLI flag; ``validate()`` keeps only the rules that relate several options. Importable without torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import WeightsmithError


@dataclass(frozen=True)
class Spec:
    name: str
    default: Any
    help: str
    label: str
    flag: str | None = None
    lo: float | None = None  # bounds of the value, enforced by check_declared (and offered by widgets);
    hi: float | None = None  # inclusive unless lo_open / hi_open
    step: float | None = None
    choices: tuple | None = None  # the allowed values (of each element, for a tuple option)
    lo_open: bool = False
    hi_open: bool = False
    kind: str = "any"  # from the annotation: int, float, str, bool, tuple (of item_kind), any
    item_kind: str = "any"
    optional: bool = False  # the annotation admits None

    @property
    def who(self) -> str:
        """How a sentence names the option: ``samples (--samples)``."""
        return f"{self.name} ({self.flag})" if self.flag else self.name

    @property
    def cli_help(self) -> str:
        """The help text for argparse (which reads ``%`` as a format character)."""
        return self.help.replace("%", "%%")


def option(
    default,
    help: str,
    *,
    label: str | None = None,
    flag: str | None = None,
    lo=None,
    hi=None,
    step=None,
    choices=None,
    lo_open: bool = False,
    hi_open: bool = False,
):
    """A dataclass field carrying its front-end description and its rule (see :class:`Spec`)."""
    meta = {
        "help": help,
        "label": label,
        "flag": flag,
        "lo": lo,
        "hi": hi,
        "step": step,
        "choices": tuple(choices) if choices is not None else None,
        "lo_open": lo_open,
        "hi_open": hi_open,
    }
    return field(default=default, metadata={"weightsmith": meta})


_KINDS = ("int", "float", "str", "bool", "tuple")


def _kinds(annotation) -> tuple[str, str, bool]:
    """(kind, item kind, optional) of a field annotation as written (``"tuple[str, ...] | None"``)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    base = next((p for p in parts if p != "None"), "")
    head, _, inner = base.partition("[")
    kind = head if head in _KINDS else "any"
    item = inner.split(",")[0].strip(" ]") if kind == "tuple" else "any"
    return kind, (item if item in _KINDS else "any"), optional


def spec(cls, name: str) -> Spec:
    """The declaration of option ``name`` of options class ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            m = f.metadata.get("weightsmith", {})
            kind, item, optional = _kinds(f.type)
            return Spec(
                name=name,
                default=f.default,
                help=m.get("help", ""),
                label=m.get("label") or name.replace("_", " "),
                flag=m.get("flag"),
                lo=m.get("lo"),
                hi=m.get("hi"),
                step=m.get("step"),
                choices=m.get("choices"),
                lo_open=bool(m.get("lo_open")),
                hi_open=bool(m.get("hi_open")),
                kind=kind,
                item_kind=item,
                optional=optional,
            )
    raise KeyError(f"{cls.__name__} has no option {name!r}")


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _is_kind(v, kind: str) -> bool:
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind == "str":
        return isinstance(v, str)
    if kind == "bool":
        return isinstance(v, bool)
    return True


_KIND_WORDS = {"int": "a whole number", "float": "a finite number", "str": "text", "bool": "True or False"}


def range_text(s: Spec) -> str:
    """The declared range as words: ``>= 1 and at most 64``, ``>= 0 and below 1`` ('' when none)."""
    parts = []
    if s.lo is not None:
        parts.append(f"{'>' if s.lo_open else '>='} {_num(s.lo)}")
    if s.hi is not None:
        parts.append(f"{'below' if s.hi_open else 'at most'} {_num(s.hi)}")
    return " and ".join(parts)


def check_value(s: Spec, v) -> None:
    """Refuse ``v`` for the option ``s`` declares (type, range, choices) with one sentence naming the
    option, its CLI flag, the rule and the value given."""
    if v is None:
        if s.optional:
            return
        raise WeightsmithError(f"{s.who} must be given ({_KIND_WORDS.get(s.kind, 'a value')}), got None.")
    if s.kind == "tuple":
        if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)):
            raise WeightsmithError(f"{s.who} must be a list of {_KIND_WORDS.get(s.item_kind, 'values')}, got {v!r}.")
        items = list(v)
        bad = [x for x in items if not _is_kind(x, s.item_kind)]
        if bad:
            raise WeightsmithError(f"{s.who}: every entry must be {_KIND_WORDS[s.item_kind]}, got {bad[0]!r}.")
        if s.choices is not None:
            bad = [x for x in items if x not in s.choices]
            if bad:
                raise WeightsmithError(
                    f"{s.who}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(map(str, s.choices))}."
                )
        return
    if not _is_kind(v, s.kind):
        rng = range_text(s) if s.kind in ("int", "float") else ""
        raise WeightsmithError(f"{s.who} must be {_KIND_WORDS[s.kind]}{' ' + rng if rng else ''}, got {v!r}.")
    if s.choices is not None and v not in s.choices:
        raise WeightsmithError(f"unknown {s.who} {v!r}; use one of {', '.join(map(str, s.choices))}.")
    if s.kind in ("int", "float"):
        low = s.lo is not None and (v <= s.lo if s.lo_open else v < s.lo)
        high = s.hi is not None and (v >= s.hi if s.hi_open else v > s.hi)
        if low or high:
            raise WeightsmithError(f"{s.who} must be {range_text(s)}, got {v!r}.")


def check_declared(options) -> None:
    """Every field of an options dataclass against its declaration (:func:`check_value`), in field
    order: the one place bounds, choices and types are enforced, on every path (CLI, quick
    settings, hosts' widgets and the Python API all end in ``validate()``)."""
    for f in dataclasses.fields(options):
        if "weightsmith" in f.metadata:
            check_value(spec(type(options), f.name), getattr(options, f.name))


def specs(cls) -> dict[str, Spec]:
    return {f.name: spec(cls, f.name) for f in dataclasses.fields(cls)}


def from_values(cls, values: dict, *, where: str = "options", aliases: dict | None = None):
    """``cls(**values)`` for host values, strictly: an unknown key is an error that names it and the
    known ones; ``None`` means "the default"; the result is validated."""
    names = [f.name for f in dataclasses.fields(cls)]
    kw = {}
    for k, v in values.items():
        k = (aliases or {}).get(k, k)
        if k not in names:
            raise WeightsmithError(
                f"{where}: unknown option {k!r} for {cls.__name__}; known options: {', '.join(names)}."
            )
        if v is not None:
            kw[k] = v
    out = cls(**kw)
    validate = getattr(out, "validate", None)
    if validate is not None:
        validate()
    return out


def parse_layer_range(text, what: str = "text-encoder layers"):
    """The one layer-range syntax of every front end: ''/'auto'/'all' → None (the default set);
    '3-8' or '3..8' → (3, 8) inclusive; '5' → (5, 5)."""
    if text is None or isinstance(text, tuple):
        return text
    t = str(text).strip().lower().replace("..", "-")
    if t in ("", "auto", "all"):
        return None
    try:
        if "-" in t:
            a, b = t.split("-", 1)
            lo, hi = int(a), int(b)
        else:
            lo = hi = int(t)
    except ValueError:
        raise WeightsmithError(
            f"{what} {text!r} is not a range; write e.g. 0-7 (inclusive) or a single layer, "
            "or leave it empty for the default."
        ) from None
    if lo < 0 or hi < lo:
        raise WeightsmithError(f"{what} {text!r}: write FIRST-LAST with 0 <= FIRST <= LAST.")
    return (lo, hi)
