"""The public algorithms, re-implemented as oracles for tests and baselines for the benches
(docs/method.md, "UCE" and "LoRA merging"):

- :func:`reference_uce`: the public UCE script's ``edit_model`` (``rohitgandikota/unified-concept-editing``,
  older token rule): for every projection matrix in turn it re-encodes every target/guide pair, projects
  the features through every matrix, accumulates ``mat1 = λW + Σ v kᵀ`` and ``mat2 = λI + Σ k kᵀ`` and
  sets ``W = mat1 · mat2⁻¹`` (float32, ``torch.inverse``), ``technique="replace"`` so that
  ``v* = W_o c*``; ``bench erase`` times ours against it and the erasure tests check ours agrees.
- :func:`reference_iteris`: IterIS storing every feature, as the public IterIS code does, with our
  sampling protocol and math; ``bench merge`` checks the streaming solver's merge against it.
"""

from __future__ import annotations


def reference_uce(model, old_texts, new_texts, retain_texts, lamb=0.5, erase_scale=1.0, preserve_scale=1.0):
    """The public script's algorithm (per-matrix loop, re-encoding inside it); returns new weights."""
    import torch

    tok = model.tokenizers["text_encoder"]
    te = model.text_encoders["text_encoder"]
    blocks = model.unet_cross_attention_names()
    mats = [model.module(b + ".to_v") for b in blocks] + [model.module(b + ".to_k") for b in blocks]
    weights = [m.weight.detach().clone() for m in mats]  # edited copies (the model stays intact)

    def encode(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        out = te(ids.input_ids)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state, ids.attention_mask

    for layer_num in range(len(mats)):
        with torch.no_grad():
            W = weights[layer_num]
            mat1 = lamb * W
            mat2 = lamb * torch.eye(W.shape[1], dtype=W.dtype)
            for old_text, new_text in zip(old_texts, new_texts):
                emb, mask = encode([old_text, new_text])
                fi = int(mask[0].sum()) - 2
                fin = int(mask[1].sum()) - 2
                far = max(fi, fin)
                old_emb = emb[0][fi : len(emb[0]) - max(0, far - fi)]
                new_emb = emb[1][fin : len(emb[1]) - max(0, far - fin)]
                context = old_emb.detach()
                values = [
                    torch.nn.functional.linear(new_emb, w0).detach() for w0 in (m.weight for m in mats)
                ]  # technique="replace" with the original W
                ctx_v = context.reshape(context.shape[0], context.shape[1], 1)
                ctx_t = context.reshape(context.shape[0], 1, context.shape[1])
                val = values[layer_num].reshape(values[layer_num].shape[0], values[layer_num].shape[1], 1)
                mat1 = mat1 + erase_scale * (val @ ctx_t).sum(dim=0)
                mat2 = mat2 + erase_scale * (ctx_v @ ctx_t).sum(dim=0)
            for text in retain_texts:
                emb, _ = encode([text, text])
                context = emb[0].detach()
                values = [torch.nn.functional.linear(emb[1], m.weight).detach() for m in mats]
                ctx_v = context.reshape(context.shape[0], context.shape[1], 1)
                ctx_t = context.reshape(context.shape[0], 1, context.shape[1])
                val = values[layer_num].reshape(values[layer_num].shape[0], values[layer_num].shape[1], 1)
                mat1 = mat1 + preserve_scale * (val @ ctx_t).sum(dim=0)
                mat2 = mat2 + preserve_scale * (ctx_v @ ctx_t).sum(dim=0)
            weights[layer_num] = mat1 @ torch.inverse(mat2)
    names = [b + ".to_v" for b in blocks] + [b + ".to_k" for b in blocks]
    return dict(zip(names, weights))


def reference_iteris(model, loras, samples, opts):
    """Store-all-features IterIS (the public code's memory behaviour, our sampling protocol and math).
    Returns (factors, feature bytes {"text_encoder": b, "unet": b} at the peak)."""
    import torch

    from ..merge.iteris import lora_factors
    from ..merge.sampling import make_scheduler
    from ..merge.stats import DeltaHooks, module_rows

    every = sorted(set().union(*[set(l.modules) for l in loras]))
    facs = [lora_factors(l) for l in loras]
    # same modules as ours: inputs wider than max_gram_dim take the weighted sum, nothing stored
    wide = [n for n in every if model.module(n).weight[0].numel() > opts.max_gram_dim]
    names = [n for n in every if n not in wide]
    hooks = DeltaHooks(model, every)
    for i, f in enumerate(facs):
        hooks.add(f"lora{i}", f)
    store = {"target": None}
    handles = []
    for n in names:

        def cap(mod, inp, out, n=n):
            if store["target"] is not None:
                store["target"][n].append(module_rows(mod, inp[0]).float().cpu())

        handles.append(model.module(n).register_forward_hook(cap))
    widths = {n: model.module(n).weight[0].numel() for n in names}
    k = len(loras)
    X, traj = [], []
    peak = {"text_encoder": 0, "unet": 0}

    def feature_bytes(*sets):
        out = {"text_encoder": 0, "unet": 0}
        for s in sets:
            for d in s:
                for n, rows in d.items():
                    out["unet" if n.startswith("unet.") else "text_encoder"] += sum(r.numel() * 4 for r in rows)
        return out

    def run_batches(i, key, record):
        B = opts.batch_size
        ss = samples[i]
        for b in range(0, len(ss), B):
            batch = ss[b : b + B]
            prompts = [s.prompt for s in batch]
            hooks.use(key)
            cond = model.encode(prompts)
            p = next(model.unet.parameters())
            if record:
                sched = make_scheduler(model)
                sched.set_timesteps(opts.steps)
                z = torch.stack(
                    [
                        torch.randn(
                            (4, opts.latent_size, opts.latent_size), generator=torch.Generator().manual_seed(s.seed)
                        )
                        for s in batch
                    ]
                )
                steps = []
                for t in sched.timesteps:
                    steps.append((z.clone(), t))
                    eps = model.unet(z.to(p.dtype), t, encoder_hidden_states=cond.context).sample
                    z = sched.step(eps, t, z).prev_sample
                traj[i].append(steps)
            else:
                for z, t in traj[i][b // B]:
                    model.unet(z.to(p.dtype), t, encoder_hidden_states=cond.context)

    def solve(grams, lam):
        """Per module, as the public code's layer loop: Grams from the stored features, then solve."""
        out = {}
        for n in names:
            M = None
            D = []
            for i in range(k):
                C, H = grams(i, n)
                w = lam[i][n]
                Hr = H + opts.alpha2 * torch.linalg.matrix_norm(H) * torch.eye(H.shape[0], dtype=H.dtype)
                M = w * Hr if M is None else M + w * Hr
                if n in facs[i]:
                    D.append(
                        (
                            i,
                            facs[i][n][1]
                            @ (C + opts.alpha1 * torch.linalg.matrix_norm(C) * torch.eye(C.shape[0], dtype=C.dtype)),
                        )
                    )
            Dcat = torch.cat([d for _, d in D], 0)
            down = torch.linalg.solve(M, Dcat.t()).t()
            up = torch.cat([lam[i][n] * facs[i][n][0] for i, _ in D], 1)
            out[n] = (up, down)
        for n in wide:
            out[n] = (torch.cat([f[n][0] for f in facs if n in f], 1), torch.cat([f[n][1] for f in facs if n in f], 0))
        return out

    try:
        with torch.no_grad():
            for i in range(k):
                X.append({n: [] for n in names})
                traj.append([])
                store["target"] = X[i]
                run_batches(i, f"lora{i}", True)
                store["target"] = None
            peak = feature_bytes(X)
            lam = []
            for i in range(k):
                lam.append({})
                for n in names:
                    Xi = torch.cat(X[i][n]).double()
                    W = model.weight(n).double().reshape(model.weight(n).shape[0], -1)
                    if n in facs[i]:
                        W = W + facs[i][n][0] @ facs[i][n][1]
                    lam[i][n] = float(W.norm() ** 2 / (Xi @ W.t()).norm() ** 2)

            def grams0(i, n):
                Xi = torch.cat(X[i][n]).double()
                G = Xi.t() @ Xi
                return G, G

            cur = solve(grams0, lam)
            for _ in range(opts.iterations):
                hooks.add("merged", cur)
                Xt = []
                for i in range(k):
                    Xt.append({n: [] for n in names})
                    store["target"] = Xt[i]
                    run_batches(i, "merged", False)
                    store["target"] = None
                fb = feature_bytes(X, Xt)
                peak = {c: max(peak[c], fb[c]) for c in peak}

                def grams(i, n, Xt=Xt):
                    Xi, Xti = torch.cat(X[i][n]).double(), torch.cat(Xt[i][n]).double()
                    return Xi.t() @ Xti, Xti.t() @ Xti

                cur = solve(grams, lam)
                del Xt
    finally:
        hooks.remove()
        for h in handles:
            h.remove()
    del widths
    return cur, peak


def reference_uce_flux(
    t5_encode,
    clip_pooled,
    t5_tokenizer,
    modules: dict,
    erase_concepts,
    guide_concepts,
    preserve_concepts=(),
    lamb=0.5,
    erase_scale=1.0,
    preserve_scale=1.0,
    max_sequence_length=256,
    bias_in_targets=True,
):
    """The public ``trainscripts/uce_flux_edit.py`` closed form, re-implemented in float64 (docs/flux.md,
    "Differences from the official UCE Flux script"): for ``context_embedder`` one T5 vector per concept at
    index ``attention_mask.sum() − 2`` of the padded encoding, for ``text_embedder.linear_1`` (768 columns
    in Flux; here: as wide as the pooled vector) the CLIP pooled vector; targets ``module(c*)`` (weight and
    bias when ``bias_in_targets``, as the script has it); ``W' = (λW + Σ η v* cᵀ)(λI + Σ η c cᵀ)⁻¹`` over the
    erase/guide pairs and the preserved concepts (targets ``module(p)``). ``t5_encode(texts)`` → [B, L, d]
    and ``clip_pooled(texts)`` → [B, d]: the text encoders; ``modules``: name → (W, b). Returns name → W'."""
    import torch

    F = torch.float64
    emb = {}
    for e in list(erase_concepts) + list(guide_concepts) + list(preserve_concepts):
        if e in emb:
            continue
        tok = t5_tokenizer(
            [e], padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        idx = int(tok["attention_mask"].sum()) - 2
        hidden = t5_encode([e])[0].to(F)
        emb[e] = (hidden[idx], clip_pooled([e])[0].to(F))
    out = {}
    for name, (W, b) in modules.items():
        W, b = W.to(F), b.to(F)
        which = 0 if W.shape[1] == emb[erase_concepts[0]][0].shape[0] else 1

        def module(x, W=W, b=b):
            return W @ x + (b if bias_in_targets else 0)

        mat1 = lamb * W
        mat2 = lamb * torch.eye(W.shape[1], dtype=F)
        for e, g in zip(erase_concepts, guide_concepts):
            c = emb[e][which][:, None]
            v = module(emb[g][which])[:, None]
            mat1 = mat1 + erase_scale * (v @ c.T)
            mat2 = mat2 + erase_scale * (c @ c.T)
        for p in preserve_concepts:
            c = emb[p][which][:, None]
            v = module(emb[p][which])[:, None]
            mat1 = mat1 + preserve_scale * (v @ c.T)
            mat2 = mat2 + preserve_scale * (c @ c.T)
        out[name] = mat1 @ torch.inverse(mat2)
    return out
