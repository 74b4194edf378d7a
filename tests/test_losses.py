"""Numbers for oisd_lab.losses: hand-computed cases, naive references, invariants."""

from __future__ import annotations

import math

import pytest
import torch

from oisd_lab.losses import (
    advantage_weights,
    aggregate,
    alignment_loss,
    attention_cosine,
    attention_row_jsd,
    chunked_lens_jsd,
    clipped_surrogate,
    entropy_from_logits,
    group_advantages,
    jsd,
    kl_from_logits,
    kl_k3,
    selective_log_softmax,
    token_logps,
)

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- advantages

# Groups of G=3: [1, 0, 0] (mean 1/3), [.5, .5, .5] (constant), [2, 0, 1] (mean 1).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0])
S1 = math.sqrt(1 / 3)  # group 1 Bessel std: sqrt((4/9 + 1/9 + 1/9) / 2)
S1_POP = math.sqrt(2 / 9)  # group 1 population std
S3_POP = math.sqrt(2 / 3)  # group 3 population std (Bessel std is exactly 1)
# Whole batch: mean 5.5/9, sum of squared deviations 6.75 - 5.5**2/9 = 3.388...
SSD = 6.75 - 5.5**2 / 9
SB, SB_POP = math.sqrt(SSD / 8), math.sqrt(SSD / 9)
DEV = [2 / 3, -1 / 3, -1 / 3, 0, 0, 0, 1, -1, 0]


@pytest.mark.parametrize(
    "scale, ddof, eps, expected",
    [
        ("group", 1, 0.0, [2 / 3 / S1, -1 / 3 / S1, -1 / 3 / S1, 0, 0, 0, 1, -1, 0]),
        (
            "group",
            0,
            0.0,
            [2 / 3 / S1_POP, -1 / 3 / S1_POP, -1 / 3 / S1_POP, 0, 0, 0, 1 / S3_POP, -1 / S3_POP, 0],
        ),
        (
            "group",
            1,
            1e-4,
            [
                2 / 3 / (S1 + 1e-4),
                -1 / 3 / (S1 + 1e-4),
                -1 / 3 / (S1 + 1e-4),
                0,
                0,
                0,
                1 / 1.0001,
                -1 / 1.0001,
                0,
            ],
        ),
        ("batch", 1, 0.0, [d / SB for d in DEV]),
        ("batch", 0, 0.0, [d / SB_POP for d in DEV]),
        ("none", 1, 1e-4, DEV),
    ],
)
def test_group_advantages_hand(scale, ddof, eps, expected):
    adv = group_advantages(REWARDS, 3, scale_rewards=scale, eps=eps, std_ddof=ddof)
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=1e-6)


def test_group_advantages_literals():
    # The same cases written out: 1.1547005 = (2/3)/sqrt(1/3), 1.0242950 = (2/3)/0.6508541.
    adv = group_advantages(REWARDS, 3, eps=0.0)
    torch.testing.assert_close(adv[:3], torch.tensor([1.1547005, -0.5773503, -0.5773503]))
    adv = group_advantages(REWARDS, 3, scale_rewards="batch", eps=0.0)
    torch.testing.assert_close(adv[6:8], torch.tensor([1.5364426, -1.5364426]))


def test_identical_rewards_give_exact_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])  # 0.1 * 3 / 3 != 0.1 in float
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(rewards, 3, scale_rewards=scale), torch.zeros(6))
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0]), 1), torch.zeros(2))


def test_group_advantages_rejects_bad_group_size():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(7), 3)


# --------------------------------------------------------------------------- log-probs


def test_selective_log_softmax_matches_full_log_softmax():
    logits = torch.randn(2, 5, 13, generator=gen(1))
    index = torch.randint(0, 13, (2, 5), generator=gen(2))
    ref = torch.log_softmax(logits, -1).gather(-1, index[..., None]).squeeze(-1)
    for chunk in (1, 3, 512):
        torch.testing.assert_close(selective_log_softmax(logits, index, chunk_size=chunk), ref)
    bf16 = selective_log_softmax(logits.bfloat16(), index)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(
        bf16,
        torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, index[..., None]).squeeze(-1),
    )


def test_token_logps_temperature_and_gradient():
    logits = torch.randn(2, 5, 13, generator=gen(3), requires_grad=True)
    tokens = torch.randint(0, 13, (2, 5), generator=gen(4))
    got = token_logps(logits, tokens, temperature=0.7, chunk_size=3)
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(got, ref)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_got, g_ref)


def test_entropy_from_logits():
    logits = torch.randn(3, 4, 9, generator=gen(5))
    p = torch.softmax(logits.double(), -1)
    ref = -(p * p.log()).sum(-1)
    torch.testing.assert_close(
        entropy_from_logits(logits, chunk_size=5).double(), ref, atol=1e-6, rtol=1e-5
    )
    uniform = entropy_from_logits(torch.zeros(2, 8))
    torch.testing.assert_close(uniform, torch.full((2,), math.log(8)))
    masked = torch.tensor([[0.0, 0.0, -math.inf]])  # -inf logit: 0 log 0 = 0, no NaN
    torch.testing.assert_close(entropy_from_logits(masked), torch.tensor([math.log(2)]))


# --------------------------------------------------------------------------- policy loss


def test_clipped_surrogate_hand_case():
    # Both rows see ratios [1.5, 0.5, 1.1]; row 0 has A = +1, row 1 has A = -1.
    log_ratio = torch.log(torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]]))
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]])
    logps = (old + log_ratio).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    loss, info = clipped_surrogate(logps, old, adv)
    # A>0: -min(1.5, 1.2) = -1.2 (high clip), -min(.5, .8) = -.5, -min(1.1, 1.1) = -1.1
    # A<0: -min(-1.5, -1.2) = 1.5, -min(-.5, -.8) = .8 (low clip), -min(-1.1, -1.1) = 1.1
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, -1.1], [1.5, 0.8, 1.1]]))
    assert info["is_high_clipped"].tolist() == [[True, False, False], [False, False, False]]
    assert info["is_low_clipped"].tolist() == [[False, False, False], [False, True, False]]
    assert info["is_region_clipped"].tolist() == [[True, False, False], [False, True, False]]
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    # Clipped tokens carry no gradient; the others get -rho * A.
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5, -1.1], [1.5, 0.0, 1.1]]))
    loss_hi, _ = clipped_surrogate(logps, old, adv, epsilon_high=0.28)
    assert loss_hi[0, 0].item() == pytest.approx(-1.28)
    # old_logps=None: rho == 1 in value, -A in gradient.
    loss1, _ = clipped_surrogate(logps, None, adv)
    torch.testing.assert_close(loss1, -adv[:, None].expand(2, 3))


def test_kl_k3_hand_values():
    logps = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0, 0.0]])
    expected = torch.tensor([[math.exp(-1) + 1 - 1, 0.0, math.e - 1 - 1]])
    torch.testing.assert_close(kl_k3(logps, ref), expected)


# Tiny [3, 4] case: lengths 4, 2, 1; masked slots hold 1e4 (padding poison).
PT = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 1e4, 1e4], [3.0, 1e4, 1e4, 1e4]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
# Row sums 10, 6, 3 (total 19); row token counts 4, 2, 1 (total 7).
HAND = {
    "grpo": (10 / 4 + 6 / 2 + 3 / 1) / 3,  # 2.8333333
    "bnpo": 19 / 7,  # 2.7142857
    "dapo": 19 / 10,  # 1.9, with num_items_in_batch=10 (the whole accumulated batch)
    "dr_grpo": 19 / (3 * 5),  # 1.2666667, with max_completion_length=5
}
LITERALS = {"grpo": 2.8333333, "bnpo": 2.7142857, "dapo": 1.9, "dr_grpo": 1.2666667}


def naive_aggregate(pt, mask, loss_type, n_items, t_max):
    rows = [[pt[i][t] for t in range(len(pt[i])) if mask[i][t]] for i in range(len(pt))]
    total = sum(sum(r) for r in rows)
    if loss_type == "grpo":
        return sum(sum(r) / max(len(r), 1) for r in rows) / len(rows)
    if loss_type == "bnpo":
        return total / sum(len(r) for r in rows)
    if loss_type == "dapo":
        return total / n_items
    return total / (len(rows) * t_max)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_hand_values(loss_type):
    got = aggregate(PT, MASK, loss_type, num_items_in_batch=10, max_completion_length=5).item()
    assert got == pytest.approx(HAND[loss_type], rel=1e-6)
    assert got == pytest.approx(LITERALS[loss_type], rel=1e-6)
    assert got == pytest.approx(
        naive_aggregate(PT.tolist(), MASK.tolist(), loss_type, 10, 5), rel=1e-6
    )
    assert len({round(v, 6) for v in HAND.values()}) == 4  # the modes really differ


def test_aggregate_defaults_and_empty_rows():
    # Defaults: dapo uses this call's 7 tokens; dr_grpo uses B=3 and T=4.
    assert aggregate(PT, MASK, "dapo").item() == pytest.approx(19 / 7)
    assert aggregate(PT, MASK, "dr_grpo").item() == pytest.approx(19 / 12)
    empty = MASK.clone()
    empty[2] = False  # a sequence with no completion tokens contributes 0, not NaN
    assert aggregate(PT, empty, "grpo").item() == pytest.approx((2.5 + 3.0) / 3)
    assert aggregate(PT, torch.zeros_like(MASK), "bnpo").item() == 0.0
    with pytest.raises(ValueError, match="loss_type.*dr_grpo"):
        aggregate(PT, MASK, "mean")


@pytest.mark.parametrize("poison", [float("inf"), float("nan"), -1e4])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_ignores_garbage_in_masked_slots(loss_type, poison):
    dirty = torch.where(MASK, PT, poison)
    assert aggregate(dirty, MASK, loss_type).item() == pytest.approx(
        aggregate(PT, MASK, loss_type).item()
    )


# --------------------------------------------------------------------------- micro-batching

B, T, HID, V = 4, 5, 3, 7
LENGTHS = [5, 2, 4, 1]  # split [:2] / [2:] holds 7 and 5 tokens; split [:1] / [1:] holds 5 and 7


def policy_batch(seed: int = 0):
    g = gen(seed)
    weight = torch.randn(HID, V, generator=g, requires_grad=True)  # a linear "policy"
    x = torch.randn(B, T, HID, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    old = token_logps(x @ weight.detach(), tokens) + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    return weight, x, tokens, mask, old, adv


def policy_loss(weight, x, tokens, mask, old, adv, loss_type, **kw):
    per_token, _ = clipped_surrogate(token_logps(x @ weight, tokens), old, adv)
    return aggregate(per_token, mask, loss_type, **kw)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("split", [1, 2, 3])
def test_micro_batching_gives_whole_batch_gradient(loss_type, split):
    weight, x, tokens, mask, old, adv = policy_batch()
    full = policy_loss(weight, x, tokens, mask, old, adv, loss_type, max_completion_length=T)
    (g_full,) = torch.autograd.grad(full, weight)
    kw = dict(num_items_in_batch=int(mask.sum()), num_sequences=B, max_completion_length=T)
    parts = [slice(0, split), slice(split, B)]
    if loss_type == "bnpo":
        # bnpo is local by definition (TRL): with these unequal token counts (7/5, 5/7, 11/1) the
        # micro-batch mean must differ; the equal-count case is test_bnpo_equal_token_split.
        total = (
            sum(
                policy_loss(weight, x[s], tokens[s], mask[s], old[s], adv[s], "bnpo") for s in parts
            )
            / 2
        )
        assert abs(total.item() - full.item()) > 1e-4
        return
    total = sum(
        policy_loss(weight, x[s], tokens[s], mask[s], old[s], adv[s], loss_type, **kw)
        for s in parts
    )
    (g_micro,) = torch.autograd.grad(total, weight)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(g_micro, g_full)
    assert g_full.abs().sum() > 0


def test_bnpo_equal_token_split():
    # Lengths [5, 2, 4, 3] split into 7 + 7 tokens: the mean of micro-batch bnpo values is exact.
    weight, x, tokens, _, old, adv = policy_batch()
    mask = torch.arange(T)[None, :] < torch.tensor([5, 2, 4, 3])[:, None]
    full = policy_loss(weight, x, tokens, mask, old, adv, "bnpo")
    halves = [
        policy_loss(weight, x[s], tokens[s], mask[s], old[s], adv[s], "bnpo")
        for s in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(sum(halves) / 2, full)
    g_full = torch.autograd.grad(full, weight)[0]
    g_half = torch.autograd.grad(sum(halves) / 2, weight)[0]
    torch.testing.assert_close(g_half, g_full)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_identical_rewards_give_zero_policy_gradient(loss_type):
    weight, x, tokens, mask, old, _ = policy_batch()
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), num_generations=2)
    (grad,) = torch.autograd.grad(policy_loss(weight, x, tokens, mask, old, adv, loss_type), weight)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padding_poison_in_logps_is_harmless(loss_type):
    weight, x, tokens, mask, old, adv = policy_batch()
    clean = token_logps(x @ weight.detach(), tokens).requires_grad_(True)
    dirty = torch.where(mask, clean.detach(), 1e4).requires_grad_(True)
    dirty_old = torch.where(mask, old, -1e4)
    out = []
    for logps, old_logps in ((clean, old), (dirty, dirty_old)):
        per_token, _ = clipped_surrogate(logps, old_logps, adv)
        per_token = per_token + 0.1 * kl_k3(logps, torch.where(mask, old, 1e4))
        loss = aggregate(per_token, mask, loss_type)
        (grad,) = torch.autograd.grad(loss, logps)
        out.append((loss, grad))
    torch.testing.assert_close(out[1][0], out[0][0])
    assert torch.isfinite(out[1][1]).all()
    torch.testing.assert_close(out[1][1][mask], out[0][1][mask])


# --------------------------------------------------------------------------- JSD


def naive_jsd(p_logits, q_logits, beta, temperature=1.0):
    """Float64 reference: softmax, then explicit sums over probabilities."""
    p = torch.softmax(p_logits.double() / temperature, -1)
    q = torch.softmax(q_logits.double() / temperature, -1)
    m = beta * p + (1 - beta) * q

    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_jsd_matches_naive_reference(dtype, tol, beta, scale):
    p = torch.randn(3, 4, 17, generator=gen(6), dtype=torch.float64) * scale
    q = torch.randn(3, 4, 17, generator=gen(7), dtype=torch.float64) * scale
    got = jsd(p.to(dtype), q.to(dtype), beta=beta)
    assert got.dtype == dtype
    ref = naive_jsd(p.to(dtype), q.to(dtype), beta)
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


def test_jsd_invariants():
    p = torch.randn(6, 11, generator=gen(8)) * 3
    q = torch.randn(6, 11, generator=gen(9)) * 3
    torch.testing.assert_close(jsd(p, p), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        jsd(p.double(), p.double(), beta=0.2),
        torch.zeros(6, dtype=torch.float64),
        atol=1e-14,
        rtol=0,
    )
    assert (jsd(p, p) >= 0).all() and (jsd(p, q) >= 0).all() and (jsd(p, q, beta=0.2) >= 0).all()
    disjoint_p = torch.tensor([[100.0, -100.0]])  # nearly disjoint supports approach ln 2
    assert jsd(p, q).max() <= math.log(2)
    assert jsd(disjoint_p, -disjoint_p).item() == pytest.approx(math.log(2), abs=1e-6)
    torch.testing.assert_close(jsd(p, q, temperature=2.5), jsd(p / 2.5, q / 2.5))
    torch.testing.assert_close(jsd(p, q, temperature=0.5), naive_jsd(p, q, 0.5, 0.5).float())
    for beta in (0.0, 1.0):
        assert torch.equal(jsd(p, q, beta=beta), torch.zeros(6))
    masked = torch.tensor([[0.0, 1.0, -math.inf]], requires_grad=True)  # -inf logit: no NaN
    value = jsd(masked, torch.tensor([[0.5, 0.2, -math.inf]]))
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(masked.grad).all()


def test_kl_from_logits():
    p = torch.randn(4, 9, generator=gen(10))
    q = torch.randn(4, 9, generator=gen(11))
    pp, qq = torch.softmax(p.double(), -1), torch.softmax(q.double(), -1)
    ref = (pp * (pp.log() - qq.log())).sum(-1)
    torch.testing.assert_close(kl_from_logits(p, q).double(), ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(kl_from_logits(p, p), torch.zeros(4))


@pytest.mark.parametrize("checkpointed", [True, False])
def test_chunked_lens_jsd_matches_unchunked_value_and_gradient(checkpointed, monkeypatch):
    from oisd_lab import losses as losses_lib

    n, d, v = 7, 5, 11
    # the threshold decides whether chunks are checkpointed: 0 always, above n * v never
    monkeypatch.setattr(losses_lib, "LENS_CHECKPOINT_MIN_ELEMENTS", 0 if checkpointed else n * v)
    torch.manual_seed(0)
    readout = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, v, bias=False))
    hidden = torch.randn(n, d, generator=gen(12), requires_grad=True)
    teacher = torch.randn(n, v, generator=gen(13), requires_grad=True)
    params = [hidden, *readout.parameters()]

    ref = jsd(teacher.detach(), readout(hidden), beta=0.3, temperature=1.5)
    ref_grads = torch.autograd.grad((ref * torch.arange(n)).sum(), params)
    calls = []
    readout.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))

    saved = []
    hooks = (lambda t: saved.append(t.numel()) or t, lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(*hooks):
        got = chunked_lens_jsd(hidden, teacher, readout, beta=0.3, temperature=1.5, chunk_size=3)
    got_grads = torch.autograd.grad((got * torch.arange(n)).sum(), params)

    torch.testing.assert_close(got, ref)
    for g_got, g_ref in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g_got, g_ref)
    assert teacher.grad is None
    # 3 chunks of 3 rows: a checkpointed chunk's readout runs again in backward
    assert sorted(calls) == ([1, 1, 3, 3, 3, 3] if checkpointed else [1, 3, 3])
    if not checkpointed:  # small work: nothing is recomputed
        return
    assert max(saved, default=0) < n * v  # no full [N, V] activation kept for backward
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(*hooks):
        jsd(teacher.detach(), readout(hidden))
    assert max(saved) == n * v  # the hook does see [N, V] tensors when nothing is chunked


def test_chunked_lens_jsd_no_grad_and_empty():
    readout = torch.nn.Linear(4, 6)
    with torch.no_grad():
        out = chunked_lens_jsd(torch.randn(5, 4), torch.randn(5, 6), readout, chunk_size=2)
    assert out.shape == (5,) and (out >= 0).all()
    assert chunked_lens_jsd(torch.zeros(0, 4), torch.zeros(0, 6), readout).shape == (0,)


# --------------------------------------------------------------------------- attention


def attention_maps(seed, b=2, h=3, t=5, key_mask=None):
    scores = torch.randn(b, h, t, t, generator=gen(seed), dtype=torch.float64) * 2
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None]  # causal
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    return torch.softmax(scores.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)


def naive_row_jsd(ta, sa, query_mask, key_mask, per_head, exclude_sink, beta=0.5, to_mean=False,
                  head_sum=False):
    """Loop over (b, t[, h]): build each row as a python list, then sum x log(x/m) by hand.
    The sink is the first key that key_mask keeps in row b."""
    b_, h_, t_, s_ = ta.shape
    out = torch.zeros(b_, t_, dtype=torch.float64)

    def prep(row, b):
        real = [k for k in range(s_) if key_mask is None or key_mask[b, k]]
        sink = real[0] if real else -1
        row = [
            0.0
            if (exclude_sink and k == sink) or (key_mask is not None and not key_mask[b, k])
            else float(x)
            for k, x in enumerate(row)
        ]
        mass = sum(row)
        return [x / mass for x in row] if mass > 0 else None

    def div(p, q):
        m = [beta * a + (1 - beta) * c for a, c in zip(p, q, strict=True)]
        kl = lambda a, mm: sum(x * math.log(x / y) for x, y in zip(a, mm, strict=True) if x > 0)  # noqa: E731
        return beta * kl(p, m) + (1 - beta) * kl(q, m)

    for b in range(b_):
        for t in range(t_):
            if not query_mask[b, t]:
                continue
            if to_mean:
                rows = [(ta[b, :, t].mean(0), sa[b, i, t]) for i in range(h_)]
            elif per_head:
                rows = [(ta[b, i, t], sa[b, i, t]) for i in range(h_)]
            else:
                rows = [(ta[b, :, t].mean(0), sa[b, :, t].mean(0))]
            vals = []
            for tr, sr in rows:
                p, q = prep(tr.tolist(), b), prep(sr.tolist(), b)
                vals.append(div(p, q) if p is not None and q is not None else 0.0)
            out[b, t] = sum(vals) / (1 if head_sum else len(vals))
    return out


@pytest.mark.parametrize("head_reduce", ["mean", "per_head"])
@pytest.mark.parametrize("exclude_sink", [False, True])
@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_attention_row_jsd_matches_naive_loop(head_reduce, exclude_sink, beta):
    key_mask = torch.tensor([[True] * 5, [False, True, True, True, True]])  # row 1 left-padded
    query_mask = torch.tensor([[False, True, True, True, True], [False, False, True, True, False]])
    teacher = attention_maps(20, key_mask=key_mask)
    student = attention_maps(
        21
    )  # student leaks mass onto the pad key: key_mask must renormalise it
    got = attention_row_jsd(
        teacher, student, query_mask, key_mask, head_reduce, exclude_sink, beta=beta
    )
    ref = naive_row_jsd(
        teacher, student, query_mask, key_mask, head_reduce == "per_head", exclude_sink, beta
    )
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8)


def test_attention_row_jsd_properties():
    teacher, student = attention_maps(22), attention_maps(23)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    query_mask = torch.ones(2, 5, dtype=torch.bool)
    mean = attention_row_jsd(teacher, student, query_mask)
    per_head = attention_row_jsd(teacher, student, query_mask, head_reduce="per_head")
    assert (per_head[:, 1:] > mean[:, 1:] + 1e-6).all()  # joint convexity (every row keeps mass 1); row 0 is one key
    assert torch.equal(
        attention_row_jsd(teacher, teacher, query_mask), torch.zeros(2, 5, dtype=torch.float64)
    )
    # Excluding the sink: query 0 sees only key 0, so nothing is left -> 0; other rows equal
    # the JSD of the renormalised rows over keys 1..S-1.
    sink = attention_row_jsd(teacher, student, query_mask, exclude_sink=True)
    assert torch.equal(sink[:, 0], torch.zeros(2, dtype=torch.float64))
    renorm = [a.mean(1, keepdim=True)[..., 1:] for a in (teacher, student)]
    renorm = [a / a.sum(-1, keepdim=True).clamp(min=1e-300) for a in renorm]
    sliced = attention_row_jsd(renorm[0], renorm[1], query_mask)
    torch.testing.assert_close(sink[:, 1:], sliced[:, 1:])
    sink.sum().backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all()
    with pytest.raises(ValueError, match="head_reduce"):
        attention_row_jsd(teacher, student, query_mask, head_reduce="max")


def test_per_head_bounds_mean_from_above_only_when_rows_keep_their_mass():
    # [1 query, 2 heads, 1 row, 3 keys]; key 0 is the sink. The teacher's heads look at keys 1 and
    # 2; student head 0 puts 0.9 on the sink and the rest on key 1, student head 1 copies teacher
    # head 1. Without the sink every student head matches its teacher head: per_head gives 0.
    teacher = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)[None, :, None]
    student = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)[None, :, None]
    query_mask = torch.ones(1, 1, dtype=torch.bool)
    per_head = attention_row_jsd(teacher, student, query_mask, head_reduce="per_head", exclude_sink=True)
    mean = attention_row_jsd(teacher, student, query_mask, exclude_sink=True)
    assert per_head.item() == pytest.approx(0.0, abs=1e-12)
    # head means (0, .5, .5) and (.45, .05, .5), renormalised over keys 1, 2: (1/2, 1/2) vs (1/11, 10/11)
    p, q = [0.5, 0.5], [1 / 11, 10 / 11]
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    want = sum(0.5 * a * math.log(a / c) + 0.5 * b * math.log(b / c) for a, b, c in zip(p, q, m, strict=True))
    assert mean.item() == pytest.approx(want, rel=1e-12)
    assert want > 0.1  # per_head < mean: the convexity bound fails once heads are renormalised apart
    # the sink kept, every row keeps mass 1 and the bound holds (here with equality: head 1 adds
    # the same key-2 mass to both sides)
    kept = attention_row_jsd(teacher, student, query_mask, head_reduce="per_head")
    assert kept.item() >= attention_row_jsd(teacher, student, query_mask).item() - 1e-12


def test_attention_cosine():
    teacher, student = attention_maps(24), attention_maps(25)
    query_mask = torch.tensor([[True] * 5, [True, True, False, True, True]])
    got = attention_cosine(teacher, student, query_mask)
    tm, sm = teacher.mean(1), student.mean(1)
    ref = torch.nn.functional.cosine_similarity(tm, sm, dim=-1) * query_mask
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(attention_cosine(teacher, teacher, query_mask), query_mask.double())


# --------------------------------------------------------------------------- OISD weighting


def test_advantage_weights_modes():
    adv = torch.tensor([1.5, -0.5, 0.0])
    assert advantage_weights(adv, "signed").tolist() == [1.5, -0.5, 0.0]
    assert advantage_weights(adv, "unsigned").tolist() == [1.5, 0.5, 0.0]
    assert advantage_weights(adv, "positive").tolist() == [1.5, 0.0, 0.0]
    assert advantage_weights(adv, "uniform").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="method.weighting"):
        advantage_weights(adv, "abs")


def alignment_grad(adv, weighting, loss_type="dapo"):
    teacher = torch.randn(3, 4, 9, generator=gen(30))
    student = torch.randn(3, 4, 9, generator=gen(31), requires_grad=True)
    div = jsd(teacher, student)
    loss = alignment_loss(div, MASK, adv, weighting, loss_type, num_items_in_batch=10)
    (grad,) = torch.autograd.grad(loss, student)
    return loss, grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_signed_weighting_flips_gradient(loss_type):
    adv = torch.tensor([1.3, -0.4, 0.8])
    loss_pos, g_pos = alignment_grad(adv, "signed", loss_type)
    loss_neg, g_neg = alignment_grad(-adv, "signed", loss_type)
    assert torch.equal(g_pos, -g_neg) and g_pos.abs().sum() > 0
    assert loss_pos.item() == -loss_neg.item()
    _, g_u_pos = alignment_grad(adv, "unsigned", loss_type)
    _, g_u_neg = alignment_grad(-adv, "unsigned", loss_type)
    assert torch.equal(g_u_pos, g_u_neg)


def test_alignment_loss_hand_value_and_poison():
    div = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 1e4, 1e4], [0.7, 1e4, 1e4, 1e4]])
    adv = torch.tensor([1.0, -2.0, 0.5])
    # signed, grpo: (1.0 * 0.25 + -2.0 * 0.55 + 0.5 * 0.7) / 3 = -0.1666667
    got = alignment_loss(div, MASK, adv, "signed", "grpo")
    assert got.item() == pytest.approx(-0.1666667, rel=1e-6)
    # positive, dapo over 7 tokens: (1.0 + 0 + 0.35) / 7 = 0.1928571
    assert alignment_loss(div, MASK, adv, "positive", "dapo").item() == pytest.approx(
        0.1928571, rel=1e-6
    )
