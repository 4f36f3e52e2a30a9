"""How an option is declared once and read by every front end (CLI, ComfyUI nodes, A1111 tab).

Options are dataclass fields declared with :func:`option`: the default, the help text, the
range and the CLI flag live in the field's metadata, next to the value. Front ends never restate
a default; they ask :func:`spec` (``spec(EraseOptions, "lam").default``) and build options from
host values with :func:`from_values`, which refuses a key the options do not have (a renamed
field becomes an error, not a silently ignored input). Importable without torch.
"""
from __future__ import annotations

import dataclasses
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
    lo: float | None = None          # inclusive bounds a widget may offer (validate() has the exact rule)
    hi: float | None = None
    step: float | None = None
    choices: tuple | None = None

    @property
    def cli_help(self) -> str:
        """The help text for argparse (which reads ``%`` as a format character)."""
        return self.help.replace("%", "%%")


def option(default, help: str, *, label: str | None = None, flag: str | None = None, lo=None, hi=None,
           step=None, choices=None):
    """A dataclass field carrying its front-end description (see :class:`Spec`)."""
    meta = {"help": help, "label": label, "flag": flag, "lo": lo, "hi": hi, "step": step,
            "choices": tuple(choices) if choices is not None else None}
    return field(default=default, metadata={"weightsmith": meta})


def spec(cls, name: str) -> Spec:
    """The declaration of option ``name`` of options class ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            m = f.metadata.get("weightsmith", {})
            return Spec(name=name, default=f.default, help=m.get("help", ""),
                        label=m.get("label") or name.replace("_", " "), flag=m.get("flag"), lo=m.get("lo"),
                        hi=m.get("hi"), step=m.get("step"), choices=m.get("choices"))
    raise KeyError(f"{cls.__name__} has no option {name!r}")


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
            raise WeightsmithError(f"{where}: unknown option {k!r} for {cls.__name__}; known options: "
                                   f"{', '.join(names)}.")
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
        raise WeightsmithError(f"{what} {text!r} is not a range; write e.g. 0-7 (inclusive) or a single layer, "
                               "or leave it empty for the default.") from None
    if lo < 0 or hi < lo:
        raise WeightsmithError(f"{what} {text!r}: write FIRST-LAST with 0 <= FIRST <= LAST.")
    return (lo, hi)
