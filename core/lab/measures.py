"""What the benches and sweeps measure on an erasure, each defined once (docs/erase-sweep.md,
docs/method.md "Concept erasure"): the UNet k/v residual ratio on paired prompts, the drift on
preserve prompts, the text-encoder-only part of an edit, and the Spearman correlation used to tell
whether ‖Δ‖/‖W‖ falls with depth.
"""

from __future__ import annotations


def unet_kv_names(model) -> list[str]:
    """The UNet cross-attention ``to_k``/``to_v`` matrices, block by block."""
    return [f"{b}.{s}" for b in model.unet_cross_attention_names() for s in ("to_k", "to_v")]


def _kv_weights(model, deltas):
    """``(W_o, W')`` of every UNet k/v matrix in float64, ``W' = W_o + deltas[name]`` (``W_o`` without one)."""
    for name in unet_kv_names(model):
        W = model.weight(name).double()
        d = deltas.get(name)
        yield W, (W + d.double() if d is not None else W)


def kv_residual(model, enc_model, deltas, targets, anchors) -> float:
    """Mean over the UNet cross-attention ``to_k``/``to_v`` of ``‖W'X' − W_oY‖ / ‖W_o(Y − X⁰)‖`` on every
    paired row of ``targets``/``anchors`` (concept, template, EOS and padding: the rows the UNet reads).

    ``X'`` are the target features of ``enc_model`` (the edited encoders, or ``model`` where the edit
    leaves them), ``X⁰`` of ``model``'s, ``Y`` the anchors'; ``W' = W_o + deltas[name]`` (``W_o`` where
    the edit has no delta for a matrix). ``nan`` for a model without cross-attention."""
    from ..erase.pipeline import gather
    from ..erase.tokens import align

    tok = model.tokenizers[next(iter(model.tokenizers))]
    pairs = [
        align(a.tolist(), b.tolist(), tok.eos_token_id, tok.bos_token_id)
        for a, b in zip(model.tokenize(targets), model.tokenize(anchors))
    ]
    tpos, apos = [p.target_pos for p in pairs], [p.anchor_pos for p in pairs]
    X = gather(enc_model.encode(targets).context, tpos).double()
    X0 = gather(model.encode(targets).context, tpos).double()
    Y = gather(model.encode(anchors).context, apos).double()
    out = [float((Wn @ X - W @ Y).norm() / (W @ (Y - X0)).norm()) for W, Wn in _kv_weights(model, deltas)]
    return sum(out) / len(out) if out else float("nan")


def kv_drift(model, enc_model, deltas, prompts) -> float:
    """Mean over the same matrices of ``‖W'P' − W_oP⁰‖ / ‖W_oP⁰‖`` on ``prompts``, all tokens."""
    c0 = model.encode(prompts).context.double()
    P0 = c0.reshape(-1, c0.shape[-1]).T
    P = enc_model.encode(prompts).context.double().reshape(-1, c0.shape[-1]).T
    out = [float((Wn @ P - W @ P0).norm() / (W @ P0).norm()) for W, Wn in _kv_weights(model, deltas)]
    return sum(out) / len(out)


def encoders_only(model, edit):
    """The model with only the text-encoder part of an edit applied (the UNet is read via deltas)."""
    import copy

    from ..edit import Edit

    te_only = {k: v for k, v in edit.deltas.items() if not k.startswith("unet.")}
    return Edit(edit.family, edit.unet_config, te_only).apply(model) if te_only else copy.copy(model)


def spearman(ys) -> float:
    """Spearman correlation of ys with their index (no ties expected in float data)."""
    n = len(ys)
    if n < 3:
        return float("nan")
    order = sorted(range(n), key=lambda i: ys[i])
    rank = [0] * n
    for r, i in enumerate(order):
        rank[i] = r
    d2 = sum((rank[i] - i) ** 2 for i in range(n))
    return 1 - 6 * d2 / (n * (n * n - 1))
