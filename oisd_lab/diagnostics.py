"""Per-layer view of the policy (no grad): logit-lens and attention metrics on completion tokens.

For every diagnosed layer k (a `hidden_states` index; k = L is the final layer itself):
- `lens_acc`: argmax of the lens distribution p_k equals the token the policy sampled;
- `agree_top1`: argmax p_k equals argmax p_L;
- `kl`: KL(p_L || p_k); `jsd`: symmetric JSD(p_L, p_k); `entropy`: H(p_k), all in nats;
- `attn_jsd` / `attn_cos`: JSD and cosine similarity of layer k's head-mean attention rows to
  the final layer's rows (and `attn_jsd_head`, one value per head, for tables).
Each is averaged over completion tokens, overall and split by advantage sign and by correctness.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from . import losses
from .attention import AttentionCapture, attention_layer_of, hidden_index_of
from .step import policy_forward

METRICS = ("lens_acc", "agree_top1", "kl", "jsd", "entropy", "attn_jsd", "attn_cos")


def _splits(adv: torch.Tensor, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """[b] boolean row selections: all, advantage sign, correct vs incorrect."""
    return {"all": torch.ones_like(adv, dtype=torch.bool), "pos": adv > 0, "neg": adv < 0,
            "correct": rewards > 0.5, "wrong": rewards <= 0.5}


def _lens_token_metrics(readout, hidden, layer, final_logits, tokens, chunk) -> dict[str, torch.Tensor]:
    """Per-token lens metrics of one layer; inputs are [N, D] / [N, V] / [N]."""
    out = defaultdict(list)
    for lo in range(0, hidden.shape[0], chunk):
        h, t, tok = hidden[lo : lo + chunk], final_logits[lo : lo + chunk], tokens[lo : lo + chunk]
        lens = readout.logits(h, layer).float()
        out["lens_acc"].append((lens.argmax(-1) == tok).float())
        out["agree_top1"].append((lens.argmax(-1) == t.argmax(-1)).float())
        out["kl"].append(losses.kl_from_logits(t, lens))
        out["jsd"].append(losses.jsd(t, lens))
        out["entropy"].append(losses.entropy_from_logits(lens))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def layer_metrics(model, readout, part, adv, rewards, layers: list[int], chunk: int = 1024) -> list[dict]:
    """Rows {layer, split, metric values..., tokens} for one micro-batch `part` (a Rollout)."""
    L, mask = readout.num_layers, part.completion_mask
    out = policy_forward(model, part, hidden_layers=layers, attn_layers=sorted({k for k in layers if k >= 1} | {L}))
    probs = {k: out.attention_rows(k).float() for k in sorted({k for k in layers if k >= 1} | {L})}
    sel = mask.bool()
    rows_of_tok = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[sel]
    final = out.logits[sel].float()
    tokens = part.completion_ids[sel]
    keys = part.attention_mask.bool()
    splits = _splits(adv, rewards)
    rows = []
    for k in layers:
        h = out.hidden[k][sel]
        per_tok = _lens_token_metrics(readout, h, k, final, tokens, chunk)
        if k >= 1:
            teacher, student = probs[L], probs[k]
            full = lambda v: v[sel]  # noqa: E731  [b, C] -> [N]
            per_tok["attn_jsd"] = full(losses.attention_row_jsd(teacher, student, sel, keys))
            per_tok["attn_cos"] = full(losses.attention_cosine(teacher, student, sel, keys))
            heads = [full(losses.attention_row_jsd(teacher[:, i : i + 1], student[:, i : i + 1], sel, keys))
                     for i in range(teacher.shape[1])]
        else:
            heads = []
        for split, row_sel in splits.items():
            tok_sel = row_sel[rows_of_tok]
            n = int(tok_sel.sum())
            row = {"layer": k, "split": split, "tokens": n}
            for name, values in per_tok.items():
                row[name] = float(values[tok_sel].sum())  # sums; `combine` divides by tokens
            if split == "all":
                row["attn_jsd_head"] = [float(v[tok_sel].sum()) for v in heads]
            rows.append(row)
    return rows


def combine(parts: list[list[dict]]) -> list[dict]:
    """Merge per-micro-batch rows (token-weighted sums) into means per (layer, split)."""
    acc: dict[tuple[int, str], dict] = {}
    for rows in parts:
        for row in rows:
            key = (row["layer"], row["split"])
            cur = acc.setdefault(key, {"layer": row["layer"], "split": row["split"], "tokens": 0})
            cur["tokens"] += row["tokens"]
            for name, value in row.items():
                if name in ("layer", "split", "tokens"):
                    continue
                if isinstance(value, list):
                    cur[name] = [a + b for a, b in zip(cur.get(name, [0.0] * len(value)), value, strict=True)]
                else:
                    cur[name] = cur.get(name, 0.0) + value
    out = []
    for cur in acc.values():
        n = cur["tokens"]
        out.append({k: v if k in ("layer", "split", "tokens") else _mean(v, n) for k, v in cur.items()})
    return sorted(out, key=lambda r: (r["layer"], r["split"]))


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
    return out


@torch.no_grad()
def snapshot(model, readout, part, rows: list[int], student_layers: list[int], tokenizer) -> list[dict]:
    """Per rollout in `rows`: for every layer x completion position the lens's top token and its
    probability, the sampled tokens, and head-mean attention maps of student and final layers."""
    L = readout.num_layers
    P, mask = part.prompt_length, part.completion_mask
    attn_layers = sorted({attention_layer_of(k) for k in student_layers} | {attention_layer_of(L)})
    with AttentionCapture(model, attn_layers) as cap:
        out = model(input_ids=part.input_ids[rows], attention_mask=part.attention_mask[rows],
                    output_hidden_states=True, use_cache=False)
        maps = {i: cap.probs[i].float().mean(1) for i in attn_layers}  # [r, T, S]
    result = []
    for j, row in enumerate(rows):
        n = int(mask[row].sum())
        start = int((part.attention_mask[row] == 0).sum())  # left padding of the prompt
        top_tok, top_p = [], []
        for k in range(L + 1):
            h = out.hidden_states[k][j, P - 1 : P - 1 + n]
            probs = readout.logits(h, k).float().softmax(-1)
            p, t = probs.max(-1)
            top_tok.append(tokenizer.convert_ids_to_tokens(t.tolist()))
            top_p.append(p.tolist())
        ids = part.input_ids[row]
        result.append({
            "row": row,
            "prompt": tokenizer.decode(ids[start:P], skip_special_tokens=True),
            "tokens": tokenizer.convert_ids_to_tokens(ids[P : P + n].tolist()),
            "context_tokens": tokenizer.convert_ids_to_tokens(ids[start : P + n].tolist()),
            "top_token": top_tok, "top_prob": top_p,
            "attention": {f"L{hidden_index_of(i)}": maps[i][j, P - 1 : P - 1 + n, start : P + n].tolist() for i in attn_layers},
        })
    return result


def default_diag_layers(num_layers: int, limit: int = 12) -> list[int]:
    """All layers for small models; otherwise about `limit` evenly spaced ones plus the last."""
    if num_layers <= limit:
        return list(range(1, num_layers + 1))
    step = num_layers / (limit - 1)
    return sorted({max(1, round(i * step)) for i in range(limit - 1)} | {num_layers})
