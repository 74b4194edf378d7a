"""Per-layer view of the policy (no grad): logit-lens and attention metrics on completion tokens.

For every diagnosed layer k (a `hidden_states` index; k = L is the final layer itself):
- `lens_acc`: argmax of the lens distribution p_k equals the token the policy sampled;
- `agree_top1`: argmax p_k equals argmax p_L;
- `kl`: KL(p_L || p_k); `jsd`: symmetric JSD(p_L, p_k); `entropy`: H(p_k), all in nats;
- `attn_jsd` / `attn_cos`: JSD and cosine similarity of layer k's head-mean attention rows to
  the final layer's rows (and `attn_jsd_head`, one value per head, for tables).
Each is averaged over completion tokens, overall and split by advantage sign and by correctness.

Sampling (`log.diag_rollouts`): a logging step diagnoses a uniform random sample of m of its M
rollouts (without replacement), every completion token of each, since the forward, the lens and
the attention rows all cost per rollout. A metric's value is the ratio estimate r = sum_i y_i /
sum_i n_i over the sampled rollouts i of a split (y_i: the rollout's token sum, n_i: its tokens),
and beside it `se_<metric>` is its standard error,
    se(r)^2 = (1 - m/M) / (m (m - 1) nbar^2) * sum_i (y_i - r n_i)^2,    nbar = mean n_i,
the textbook ratio estimator's (bias O(1/m), small against se). With every rollout diagnosed
(m = M) se is 0; with one rollout in a split it is None.

Memory of one pass (`layer_metrics` on r rows of T = P + C positions; s bytes per element of the
model's dtype; n_h diagnosed layers, n_a of them with attention, both counting the final layer).
Nothing here holds a tensor per model layer, so the bound does not grow with depth:

    peak <= F                                      one plain no-grad forward of the r rows
          + 2 n_h r C D s                           the diagnosed hidden states at the C positions
          + n_a r T (H + H_kv) d s                  captured q/k of the diagnosed attention layers
          + 8 c V 4                                 one chunk of c tokens of vocabulary-sized float32 work
          + 6 r H B T 4                             one block of B attention rows, teacher and student
          + r C (n_h (5 + H) + 8) 4                 per-token metric values

(`peak_bound`). F is what any forward costs: the activations of one layer at a time, as no
gradient is kept. No [b, T, V] logits are made: the final layer's logits are read chunk by chunk
from its hidden state. `DIAG_TOKENS` caps r T, `run_hooks.MAX_DIAG_ROWS` the rollouts per step,
and `diagnosed_layers` keeps n_h at about 14 on deep models.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from . import losses
from .anatomy import backbone_of
from .attention import AttentionCapture, attention_layer_of, hidden_index_of
from .hidden_capture import HiddenCapture
from .step import ATTN_ROW_BLOCK, VOCAB_CHUNK_ELEMENTS, attention_row_blocks, completion_positions

METRICS = ("lens_acc", "agree_top1", "kl", "jsd", "entropy", "attn_jsd", "attn_cos")
LENS_METRICS = METRICS[:5]
DIAG_TOKENS = 8192
"""Sequence positions (rows x padded length) per diagnostics forward: at 2.3k-token rollouts,
three rows per pass; at tiny lengths the micro-batch decides."""
ALL_LAYERS_UP_TO = 32
"""Models up to this depth are diagnosed at every layer 0..L by default."""
SNAPSHOT_TOKENS = 512
"""Completion tokens per snapshot rollout (the top-token and attention-map view for notebooks)."""


def diag_rows(seq_len: int, micro_batch: int) -> int:
    """Rollouts per diagnostics forward: the micro-batch, capped at `DIAG_TOKENS` positions."""
    return max(1, min(micro_batch, DIAG_TOKENS // max(seq_len, 1)))


def vocab_chunk(chunk_size: int, vocab: int) -> int:
    """Tokens per chunk of vocabulary-sized work: `method.chunk_size`, capped at one block."""
    return max(1, min(chunk_size, VOCAB_CHUNK_ELEMENTS // vocab))


def peak_bound(rows: int, seq_len: int, completion_len: int, hidden: int, heads: int, kv_heads: int,
               head_dim: int, vocab: int, n_hidden: int, n_attn: int, dtype_bytes: int, chunk: int,
               forward_bytes: int) -> int:
    """The module docstring's bound, in bytes; `forward_bytes` is F (one plain no-grad forward)."""
    r, T, C = rows, seq_len, completion_len
    return (forward_bytes + 2 * n_hidden * r * C * hidden * dtype_bytes
            + n_attn * r * T * (heads + kv_heads) * head_dim * dtype_bytes
            + 8 * vocab_chunk(chunk, vocab) * vocab * 4 + 6 * r * heads * ATTN_ROW_BLOCK * T * 4
            + r * C * (n_hidden * (5 + heads) + 8) * 4)


def _splits(adv: torch.Tensor, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """[b] boolean row selections: all, advantage sign, correct vs incorrect."""
    return {"all": torch.ones_like(adv, dtype=torch.bool), "pos": adv > 0, "neg": adv < 0,
            "correct": rewards > 0.5, "wrong": rewards <= 0.5}


def _lens_token_metrics(readout, hidden: dict[int, torch.Tensor], final: torch.Tensor, tokens: torch.Tensor,
                        chunk: int) -> dict[int, dict[str, torch.Tensor]]:
    """Per-token lens metrics {k: {metric: [N]}} from hidden states {k: [N, D]}, the final layer's
    hidden state [N, D] and the sampled tokens [N]. The teacher's log-probabilities are made once
    per chunk of tokens and shared by every layer (`losses.lens_divergences`); nothing [N, V] is
    kept."""
    L = readout.num_layers
    out = {k: defaultdict(list) for k in hidden}
    for lo in range(0, final.shape[0], chunk):
        teacher = readout.logits(final[lo : lo + chunk], L).float()
        top, tok = teacher.argmax(-1), tokens[lo : lo + chunk]
        teacher_logp = torch.log_softmax(teacher, dim=-1)
        teacher_p = teacher_logp.exp()
        del teacher
        # The final layer against itself: KL = JSD = 0 exactly, as the plain functions give them.
        zero = teacher_p.new_zeros(teacher_p.shape[0])
        final_row = (zero, zero, -(teacher_p * teacher_logp).nansum(-1))
        for k, h in hidden.items():
            lens = None if k == L else readout.logits(h[lo : lo + chunk], k).float()
            arg = top if lens is None else lens.argmax(-1)
            out[k]["lens_acc"].append((arg == tok).float())
            out[k]["agree_top1"].append((arg == top).float())
            values = final_row if lens is None else losses.lens_divergences(teacher_logp, lens, teacher_p)
            for name, v in zip(("kl", "jsd", "entropy"), values, strict=True):
                out[k][name].append(v)
            del lens, values
    return {k: {name: torch.cat(v) for name, v in d.items()} for k, d in out.items()}


def _per_head_jsd(teacher: torch.Tensor, student: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                  ) -> torch.Tensor:
    """Attention-row JSD of every head on its own: [b, H, n, S] x2 -> [H, b, n] (heads as rows
    of one batch: one call instead of H)."""
    b, H, n, S = teacher.shape
    flat = losses.attention_row_jsd(teacher.reshape(b * H, 1, n, S), student.reshape(b * H, 1, n, S),
                                    query.repeat_interleave(H, 0), key.repeat_interleave(H, 0))
    return flat.view(b, H, n).transpose(0, 1)


def _attention_token_metrics(cap: AttentionCapture, part, layers: list[int], num_layers: int
                             ) -> dict[int, dict[str, torch.Tensor]]:
    """{k: {"attn_jsd": [b, C], "attn_cos": [b, C], "heads": [H, b, C]}}, recomputed from the
    captured q/k one layer and one block of completion rows at a time (`attention_row_blocks`:
    each block reads only the keys its causal rows can see)."""
    mask, keys = part.completion_mask, part.attention_mask.bool()
    start = completion_positions(part).start
    out = {k: defaultdict(list) for k in layers}
    for lo, hi, width in attention_row_blocks(part) if layers else ():
        rows = slice(start + lo, start + hi)
        query, key = mask[:, lo:hi].bool(), keys[:, :width]
        teacher = cap.probs_for(attention_layer_of(num_layers), rows, keys=width).float()  # [b, H, hi-lo, width]
        for k in layers:
            student = teacher if k == num_layers else cap.probs_for(attention_layer_of(k), rows, keys=width).float()
            out[k]["attn_jsd"].append(losses.attention_row_jsd(teacher, student, query, key))
            out[k]["attn_cos"].append(losses.attention_cosine(teacher, student, query, key))
            out[k]["heads"].append(_per_head_jsd(teacher, student, query, key))
            del student
    return {k: {name: torch.cat(v, dim=-1) for name, v in d.items()} for k, d in out.items()}


@torch.no_grad()
def layer_metrics(model, readout, part, adv, rewards, layers: list[int], chunk: int = 1024,
                  per_rollout: bool = False) -> list[dict]:
    """Rows {layer, split, metric values..., tokens} for one micro-batch `part` (a Rollout);
    per_rollout: each row also carries its rollouts' token counts and metric sums under
    "rollouts" (what `combine` needs for standard errors).

    One forward of the decoder stack (no logits); hidden states of `layers` and the final layer
    are kept at the completion positions only, attention as q/k (see the module docstring's bound).
    """
    L, mask = readout.num_layers, part.completion_mask
    sel = mask.bool()
    with_attn = sorted({k for k in layers if k >= 1})  # the embeddings (k = 0) have no attention
    attn = sorted({*with_attn, L}) if with_attn else []
    with HiddenCapture(model, readout, {*layers, L}, completion_positions(part)) as hc, \
            AttentionCapture(model, [attention_layer_of(k) for k in attn], lazy=True) as cap:
        backbone_of(model)(input_ids=part.input_ids, attention_mask=part.attention_mask, use_cache=False)
    hidden = {k: hc.hidden.pop(k)[sel] for k in sorted({*layers, L})}  # [N, D] each
    final = hidden[L] if L in layers else hidden.pop(L)
    per_tok = _lens_token_metrics(readout, hidden, final, part.completion_ids[sel],
                                  vocab_chunk(chunk, readout.unembed.weight.shape[0]))
    del hidden, final
    for k, values in _attention_token_metrics(cap, part, with_attn, L).items():
        per_tok[k].update(attn_jsd=values["attn_jsd"][sel], attn_cos=values["attn_cos"][sel],
                          heads=values["heads"][:, sel])
    cap.clear()
    return _split_rows(per_tok, layers, sel, _splits(adv, rewards), per_rollout)


def _split_rows(per_tok: dict[int, dict[str, torch.Tensor]], layers: list[int], sel: torch.Tensor,
                splits: dict[str, torch.Tensor], per_rollout: bool = False) -> list[dict]:
    """Token sums of each metric per (layer, split); `combine` divides by the token counts. The
    per-rollout sums of the split's rollouts ride along under "rollouts" (for the standard errors)."""
    rows_of_tok = torch.arange(sel.shape[0], device=sel.device)[:, None].expand_as(sel)[sel]
    counts = sel.sum(1)
    rows = []
    for k in layers:
        values = dict(per_tok[k])
        heads = values.pop("heads", None)
        sums = {name: torch.zeros(sel.shape[0], dtype=torch.float64, device=sel.device).index_add_(
            0, rows_of_tok, v.double()) for name, v in values.items()} if per_rollout else {}
        for split, row_sel in splits.items():
            tok_sel = row_sel[rows_of_tok]
            row = {"layer": k, "split": split, "tokens": int(tok_sel.sum())}
            if per_rollout:
                row["rollouts"] = {"tokens": counts[row_sel].tolist(),
                                   **{name: v[row_sel].tolist() for name, v in sums.items()}}
            for name, v in values.items():
                row[name] = float(v[tok_sel].sum())
            if split == "all":
                row["attn_jsd_head"] = [] if heads is None else [float(v) for v in heads[:, tok_sel].sum(1)]
            rows.append(row)
    return rows


def combine(parts: list[list[dict]], population: int | None = None) -> list[dict]:
    """Merge per-micro-batch rows (token-weighted sums) into means per (layer, split), each metric
    with its standard error `se_<metric>` (module docstring) and the number of diagnosed rollouts.
    population: the M rollouts the diagnosed ones were sampled from; None (all were diagnosed,
    nothing sampled) adds neither."""
    acc: dict[tuple[int, str], dict] = {}
    per_rollout: dict[tuple[int, str], dict[str, list]] = {}
    for rows in parts:
        for row in rows:
            key = (row["layer"], row["split"])
            cur = acc.setdefault(key, {"layer": row["layer"], "split": row["split"], "tokens": 0})
            cur["tokens"] += row["tokens"]
            for name, values in row.get("rollouts", {}).items():
                per_rollout.setdefault(key, {}).setdefault(name, []).extend(values)
            for name, value in row.items():
                if name in ("layer", "split", "tokens", "rollouts"):
                    continue
                if isinstance(value, list):
                    cur[name] = [a + b for a, b in zip(cur.get(name, [0.0] * len(value)), value, strict=True)]
                else:
                    cur[name] = cur.get(name, 0.0) + value
    sampled = max((len(v.get("tokens", ())) for k, v in per_rollout.items() if k[1] == "all"), default=0)
    fraction = 1.0 if population is None else sampled / max(population, 1)
    out = []
    for key, cur in acc.items():
        n = cur["tokens"]
        row = {k: v if k in ("layer", "split", "tokens") else _mean(v, n) for k, v in cur.items()}
        if key in per_rollout and population is not None:
            sums = per_rollout[key]
            row["rollouts"] = len(sums["tokens"])
            for name in sums:
                if name != "tokens":
                    row[f"se_{name}"] = ratio_se(sums[name], sums["tokens"], fraction)
        out.append(row)
    return sorted(out, key=lambda r: (r["layer"], r["split"]))


def ratio_se(sums: list[float], tokens: list[float], fraction: float = 1.0) -> float | None:
    """Standard error of r = sum(sums) / sum(tokens) over m sampled rollouts, a fraction `fraction`
    of the population (module docstring); None for fewer than two rollouts with tokens."""
    pairs = [(y, n) for y, n in zip(sums, tokens, strict=True) if n > 0]
    m = len(pairs)
    if m < 2:
        return None
    total_n = sum(n for _, n in pairs)
    r = sum(y for y, _ in pairs) / total_n
    nbar = total_n / m
    spread = sum((y - r * n) ** 2 for y, n in pairs)
    return math.sqrt(max(1.0 - fraction, 0.0) * spread / (m * (m - 1) * nbar**2))


def sample_rollouts(total: int, count: int, seed: int) -> list[int]:
    """`count` of `total` rollout indices, uniformly without replacement, sorted; all of them (the
    full pass) when count is 0 or at least total. `seed`: the run's seed and the step."""
    if count <= 0 or count >= total:
        return list(range(total))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=g)[:count].tolist())


def _mean(value, n: int):
    """Token mean of a summed metric; an empty split (no negative advantages, say) has no value."""
    if not n:
        return None
    return [x / n for x in value] if isinstance(value, list) else value / n


def scalar_metrics(rows: list[dict], layers: list[int], splits=("all", "pos", "neg")) -> dict[str, float]:
    """Flat `diag/<metric>/<split>/L<k>` keys for the bounded set `layers` (W&B and the table)."""
    out = {}
    for row in rows:
        if row["layer"] in layers and row["split"] in splits and row["tokens"] > 0:
            for name in METRICS:
                if name in row:
                    out[f"diag/{name}/{row['split']}/L{row['layer']:02d}"] = row[name]
                if row.get(f"se_{name}") is not None:
                    out[f"diag_se/{name}/{row['split']}/L{row['layer']:02d}"] = row[f"se_{name}"]
    return out


def _top_tokens(readout, h: torch.Tensor, layer: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lens top-1 token and its probability of hidden states [r, n, D] -> ([r, n], [r, n])."""
    flat = h.reshape(-1, h.shape[-1])
    probs, ids = [], []
    for lo in range(0, flat.shape[0], chunk):
        p, t = readout.logits(flat[lo : lo + chunk], layer).float().softmax(-1).max(-1)
        probs.append(p)
        ids.append(t)
    return torch.cat(ids).view(h.shape[:2]), torch.cat(probs).view(h.shape[:2])


def _head_mean_maps(cap: AttentionCapture, layer: int, rows: slice) -> torch.Tensor:
    """Head-mean attention [r, n, S] of `rows`, one block of rows at a time."""
    blocks = [cap.probs_for(layer, slice(lo, min(lo + ATTN_ROW_BLOCK, rows.stop))).float().mean(1)
              for lo in range(rows.start, rows.stop, ATTN_ROW_BLOCK)]
    return torch.cat(blocks, dim=1)


@torch.no_grad()
def snapshot(model, readout, part, rows: list[int], student_layers: list[int], tokenizer,
             chunk: int = 1024) -> list[dict]:
    """Per rollout in `rows`: for every layer x completion position (the first `SNAPSHOT_TOKENS`)
    the lens's top token and its probability, the sampled tokens, and head-mean attention maps of
    student and final layers. Each layer's top tokens are read as the forward passes it."""
    L = readout.num_layers
    P, mask = part.prompt_length, part.completion_mask
    n_max = min(mask.shape[1], SNAPSHOT_TOKENS)
    positions = slice(P - 1, P - 1 + n_max)
    attn_layers = sorted({attention_layer_of(k) for k in student_layers} | {attention_layer_of(L)})
    step = vocab_chunk(chunk, readout.unembed.weight.shape[0])
    tops: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with HiddenCapture(model, readout, range(L + 1), positions,
                       on_capture=lambda k, h: tops.__setitem__(k, _top_tokens(readout, h, k, step))), \
            AttentionCapture(model, attn_layers, lazy=True) as cap:
        backbone_of(model)(input_ids=part.input_ids[rows], attention_mask=part.attention_mask[rows], use_cache=False)
    maps = {i: _head_mean_maps(cap, i, positions) for i in attn_layers}  # [r, n_max, S]
    cap.clear()
    result = []
    for j, row in enumerate(rows):
        n = min(int(mask[row].sum()), n_max)
        start = int((part.attention_mask[row] == 0).sum())  # left padding of the prompt
        ids = part.input_ids[row]
        result.append({
            "row": row,
            "prompt": tokenizer.decode(ids[start:P], skip_special_tokens=True),
            "tokens": tokenizer.convert_ids_to_tokens(ids[P : P + n].tolist()),
            "context_tokens": tokenizer.convert_ids_to_tokens(ids[start : P + n].tolist()),
            "top_token": [tokenizer.convert_ids_to_tokens(tops[k][0][j, :n].tolist()) for k in range(L + 1)],
            "top_prob": [tops[k][1][j, :n].tolist() for k in range(L + 1)],
            "attention": {f"L{hidden_index_of(i)}": maps[i][j, :n, start : P + n].tolist() for i in attn_layers},
        })
    return result


def default_diag_layers(num_layers: int, limit: int = 12) -> list[int]:
    """All layers for small models; otherwise about `limit` evenly spaced ones plus the last."""
    if num_layers <= limit:
        return list(range(1, num_layers + 1))
    step = num_layers / (limit - 1)
    return sorted({max(1, round(i * step)) for i in range(limit - 1)} | {num_layers})


def diagnosed_layers(num_layers: int, diag_layers=None, student_layers=()) -> list[int]:
    """Hidden-state indices a logging step diagnoses: `log.diag_layers` when set; otherwise every
    layer 0..L up to `ALL_LAYERS_UP_TO` layers, and beyond that `default_diag_layers` plus the
    embeddings (0) and the student layers (14 of Qwen3-4B's 37 indices)."""
    if diag_layers:
        return sorted({int(k) for k in diag_layers})
    if num_layers <= ALL_LAYERS_UP_TO:
        return list(range(num_layers + 1))
    return sorted({0, *default_diag_layers(num_layers), *student_layers})
