"""Pure aggregation of captured fusion attention (paper Fig. 7 and the implicit-gate masses).

A record from `VisionLanguageModel.capture_attention` holds, per window w, probabilities
`[H, Lq, Lk]`. For CASA the keys are `[image_w (N_w) | text_w (Lq)]` and query j's own key
is `N_w + j`; for CA the keys are the N_w image tokens only.

For one query j of a CASA window, its probability row splits into:

    self        p[N_w + j]
    text        sum of p over the window's other text keys (N_w .. N_w + j - 1)
    image       sum of p over the image keys (0 .. N_w - 1)
    (self + text + image = 1)

Fig. 7 reports *average attention per key* in each category: `self` (one key), `text`
(mean over the other text keys), image keys averaged in groups of 16, and the vision
start/end tokens where the template has them (text keys whose ids are given).
"""

from __future__ import annotations

import torch


def window_masses(probs: torch.Tensor, num_image: int, kind: str = "casa") -> dict[str, torch.Tensor]:
    """probs [H, Lq, Lk] -> per-query masses {self, text, image}, each [H, Lq]."""
    H, Lq, Lk = probs.shape
    image = probs[..., :num_image].sum(-1)
    if kind != "casa":
        zero = torch.zeros(H, Lq, dtype=probs.dtype)
        return {"self": zero, "text": zero, "image": image}
    j = torch.arange(Lq)
    self_p = probs[:, j, num_image + j]  # [H, Lq]
    text = probs[..., num_image:].sum(-1) - self_p
    return {"self": self_p, "text": text, "image": image}


def fig7(records: list[dict], group: int = 16, special_ids: dict[str, int] | None = None,
         input_ids: torch.Tensor | None = None) -> dict:
    """Average attention per key category over heads, queries, windows and layers.

    -> {"self": float, "text": float, "image_groups": [float], "image_mean": float,
        "<special name>": float, "queries": int}
    where "text" is the mean attention to one other text key and image_groups[g] the mean
    attention to one image key of group g (keys g*group .. (g+1)*group - 1)."""
    sums: dict[str, float] = {"self": 0.0, "text": 0.0, "image": 0.0}
    counts: dict[str, float] = {"self": 0.0, "text": 0.0, "image": 0.0}
    g_sum: list[float] = []
    g_cnt: list[float] = []
    specials: dict[str, list[float]] = {k: [0.0, 0.0] for k in (special_ids or {})}
    queries = 0
    for rec in records:
        if rec.get("kind") != "casa":
            continue
        cu_t, cu_i = rec["window_cu_text"], rec["window_cu_image"]
        for w, p in enumerate(rec["probs"]):
            H, Lq, Lk = p.shape
            n_img = cu_i[w + 1] - cu_i[w]
            if Lq == 0 or Lk == 0:  # Lk == 0: no key, no attention (eq. 3's indicator, casa.fusion.windows)
                continue
            pm = p.double().mean(0)  # [Lq, Lk] averaged over heads
            j = torch.arange(Lq)
            sums["self"] += float(pm[j, n_img + j].sum())
            counts["self"] += Lq
            # other text keys: query j has j of them
            text_total = pm[:, n_img:].sum(-1) - pm[j, n_img + j]
            n_other = j.double()
            has = n_other > 0
            sums["text"] += float((text_total[has] / n_other[has]).sum())
            counts["text"] += float(has.sum())
            for g0 in range(0, n_img, group):
                gi = g0 // group
                while len(g_sum) <= gi:
                    g_sum.append(0.0)
                    g_cnt.append(0.0)
                block = pm[:, g0:min(g0 + group, n_img)]
                g_sum[gi] += float(block.mean(-1).sum())
                g_cnt[gi] += Lq
            if n_img:
                sums["image"] += float(pm[:, :n_img].mean(-1).sum())
                counts["image"] += Lq
            if specials and input_ids is not None:
                ids = input_ids[cu_t[w]:cu_t[w + 1]].tolist()
                for name, tid in special_ids.items():
                    for k, t in enumerate(ids):
                        if t == tid:  # queries at or after that key see it
                            seen = pm[k:, n_img + k]
                            specials[name][0] += float(seen.sum())
                            specials[name][1] += float(seen.numel())
            queries += Lq
    out = {
        "self": sums["self"] / max(counts["self"], 1),
        "text": sums["text"] / max(counts["text"], 1),
        "image_mean": sums["image"] / max(counts["image"], 1),
        "image_groups": [s / max(c, 1) for s, c in zip(g_sum, g_cnt)],
        "queries": queries,
    }
    for name, (s, c) in specials.items():
        out[name] = s / c if c else None
    return out


def layer_masses(records: list[dict]) -> dict[int, dict[str, float]]:
    """Mean attention mass on self / text / image per fused layer (the implicit-gate diagnostic)."""
    acc: dict[int, dict[str, list[float]]] = {}
    for rec in records:
        cu_i = rec["window_cu_image"]
        a = acc.setdefault(rec["layer"], {"self": [0.0, 0], "text": [0.0, 0], "image": [0.0, 0]})
        for w, p in enumerate(rec["probs"]):
            if p.shape[1] == 0 or (p.shape[2] == 0 and rec["kind"] == "casa"):  # no query, or no key (eq. 3)
                continue
            m = window_masses(p.double(), cu_i[w + 1] - cu_i[w], rec["kind"])
            for k, v in m.items():
                a[k][0] += float(v.sum())
                a[k][1] += v.numel()
    return {layer: {k: s / max(n, 1) for k, (s, n) in d.items()} for layer, d in acc.items()}


def head_stats(records: list[dict]) -> dict[int, list[dict[str, float]]]:
    """Per fused layer, per head: statistics that can tell a gate from uniform attention.

    Averaged over all queries (of every window that has keys):
        entropy          H(p) of the query's row, nats
        entropy_uniform  log(number of keys the query sees): H of uniform attention over them;
                         entropy / entropy_uniform near 1 is uniform, near 0 is peaked
        self_x_keys      weight on its own key x number of keys seen (CASA; 1 = uniform,
                         >> 1 = the self term dominates, the implicit gate of paper App. A)
        image_mass       total weight on the window's image keys
        text_mass        total weight on the window's text keys, self included (CASA)
        image_per_key / text_per_key  the masses divided by the key counts (1/keys when uniform)
    Averaging over heads (as `fig7` and `layer_masses` do) cancels a peaked head against a
    flat one; per head it does not.
    -> {layer: [one dict per head]}"""
    acc: dict[int, torch.Tensor] = {}  # layer -> [H, 7] sums
    counts: dict[int, torch.Tensor] = {}  # layer -> [H] queries (self_x_keys: CASA queries only)
    for rec in records:
        kind = rec.get("kind")
        cu_i = rec["window_cu_image"]
        for w, p in enumerate(rec["probs"]):
            H, Lq, Lk = p.shape
            if Lq == 0 or Lk == 0:
                continue
            n_img = cu_i[w + 1] - cu_i[w]
            p = p.double()
            j = torch.arange(Lq)
            # keys each query sees: CASA is causal over its window's text ([image | text_0..j]); CA sees the image
            seen = (n_img + j + 1).double() if kind == "casa" else torch.full((Lq,), float(n_img), dtype=torch.double)
            ent = -(p.clamp_min(1e-30).log() * p).sum(-1)  # [H, Lq]
            image = p[..., :n_img].sum(-1)  # [H, Lq]
            text = p[..., n_img:].sum(-1)  # [H, Lq]
            self_x = p[:, j, n_img + j] * seen if kind == "casa" else torch.zeros(H, Lq, dtype=torch.double)
            n_text = (j + 1).double() if kind == "casa" else torch.ones(Lq, dtype=torch.double)
            per = torch.stack([ent, seen.log().expand(H, Lq), self_x, image, text,
                               image / max(n_img, 1), text / n_text], -1).sum(1)  # [H, 7]
            acc[rec["layer"]] = acc.get(rec["layer"], 0) + per
            counts[rec["layer"]] = counts.get(rec["layer"], 0) + torch.full((H,), float(Lq), dtype=torch.double)
    names = ("entropy", "entropy_uniform", "self_x_keys", "image_mass", "text_mass", "image_per_key", "text_per_key")
    return {layer: [dict(zip(names, (s / counts[layer][h]).tolist())) for h, s in enumerate(sums)]
            for layer, sums in sorted(acc.items())}
