"""White-box attacks on an edited model: does an erased concept come back when somebody tries?
(docs/robustness.md)

    from weightsmith.core.attack import attack, AttackOptions
    res = attack(base, edited, "circle", kind="continuous", templates=["a picture of a red {}"],
                 options=AttackOptions(steps=30))
    res.loss_trace, res.words, res.embeddings

Attacks (:data:`ATTACKS`): ``continuous`` (learnt token embeddings), ``discrete`` (typed words found
by gradient-guided substitution), ``closed-form`` (the conditioning the edited cross-attention maps
closest to the target's original keys and values). ``weightsmith attack`` runs them from the command
line; ``weightsmith bench robustness`` measures them on the embedded world.
"""

from .options import ATTACK_HELP, ATTACKS, AttackOptions

__all__ = ["attack", "AttackOptions", "ATTACKS", "ATTACK_HELP", "AttackResult"]


def __getattr__(name):  # torch is imported on first use, so the options load without it
    if name in ("attack", "AttackResult"):
        from . import attacks

        return getattr(attacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
