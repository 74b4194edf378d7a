"""The closed-form backward passes of the vocabulary-sized losses against plain autograd.

`chunked_lens_jsd` (via `StudentJSD`) and `token_logps` (via `_TokenLogps`) compute their
gradients by formula; here both are checked, value and gradient, against the plain
implementations (`jsd` and a full log-softmax through autograd), including the edge cases the
formulas must get right: temperature, beta != 0.5, 16-bit logits, masked (-inf) vocabulary entries,
rows where the JSD is exactly 0, and the checkpointed path.
"""

from __future__ import annotations

import pytest
import torch

from oisd_lab import losses


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plain_lens(hidden, teacher, readout, beta, temperature):
    return losses.jsd(teacher.detach(), readout(hidden), beta=beta, temperature=temperature)


@pytest.mark.parametrize("beta, temperature", [(0.5, 1.0), (0.3, 1.7), (0.9, 0.6)])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_lens_jsd_closed_form_matches_autograd(beta, temperature, checkpointed, monkeypatch):
    monkeypatch.setattr(losses, "LENS_CHECKPOINT_MIN_ELEMENTS", 0 if checkpointed else 1 << 30)
    n, d, v = 9, 6, 23
    torch.manual_seed(0)
    readout = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, v, bias=False))
    hidden = torch.randn(n, d, generator=gen(1), requires_grad=True)
    teacher = 2 * torch.randn(n, v, generator=gen(2))
    upstream = torch.randn(n, generator=gen(3))  # signed, as advantage weights are
    params = [hidden, *readout.parameters()]

    ref = _plain_lens(hidden, teacher, readout, beta, temperature)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)
    got = losses.chunked_lens_jsd(hidden, teacher, readout, beta, temperature, chunk_size=4)
    got_grads = torch.autograd.grad((got * upstream).sum(), params)

    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    for g_got, g_ref in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)


def test_lens_jsd_closed_form_gradcheck():
    """Finite differences in float64, on the student logits directly."""
    teacher = torch.randn(4, 7, dtype=torch.float64, generator=gen(4))
    student = torch.randn(4, 7, dtype=torch.float64, generator=gen(5), requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: losses.StudentJSD.apply(teacher, q, 0.3, 1.3), (student,))


def test_lens_jsd_closed_form_masked_vocabulary_and_equal_rows():
    """-inf student and teacher entries (masked vocabulary) and rows with P == Q (JSD 0, clamped)."""
    v = 11
    teacher = torch.randn(5, v, generator=gen(6))
    student = torch.randn(5, v, generator=gen(7))
    teacher[0, :3] = float("-inf")
    student[1, 4:6] = float("-inf")
    teacher[2, 7], student[2, 7] = float("-inf"), float("-inf")
    student[3] = teacher[3]  # identical rows: a rounding residue of either sign
    student.requires_grad_(True)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0])

    ref = losses.jsd(teacher, student, beta=0.4)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), student)
    got = losses.StudentJSD.apply(teacher, student, 0.4, 1.0)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), student)

    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(got_grad).all()
    assert abs(float(got[3].detach())) < 1e-6 and torch.allclose(got_grad[3], torch.zeros(v), atol=1e-6)


def test_lens_jsd_closed_form_bf16_student():
    teacher = torch.randn(6, 13, generator=gen(8)).bfloat16()
    student = torch.randn(6, 13, generator=gen(9)).bfloat16().requires_grad_(True)
    upstream = torch.randn(6, generator=gen(10))
    ref = losses.jsd(teacher, student)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), student)
    got = losses.StudentJSD.apply(teacher, student, 0.5, 1.0)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), student)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_grad, ref_grad, rtol=2e-2, atol=1e-3)


def test_lens_jsd_degenerate_beta_stays_zero_with_gradient_path():
    readout = torch.nn.Linear(4, 6, bias=False)
    hidden = torch.randn(3, 4, generator=gen(11), requires_grad=True)
    got = losses.chunked_lens_jsd(hidden, torch.randn(3, 6), readout, beta=1.0)
    assert torch.equal(got, torch.zeros(3))
    got.sum().backward()  # backward accepts it, as with `jsd`


def _plain_token_logps(logits, tokens, temperature):
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature, block", [(1.0, 4), (0.7, 5), (1.3, 64)])
def test_token_logps_closed_form_matches_autograd(temperature, block):
    logits = (3 * torch.randn(3, 7, 19, generator=gen(12))).requires_grad_(True)
    tokens = torch.randint(0, 19, (3, 7), generator=gen(13))
    upstream = torch.randn(3, 7, generator=gen(14))
    ref = _plain_token_logps(logits, tokens, temperature)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), logits)
    got = losses.token_logps(logits, tokens, temperature, chunk_size=block)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), logits)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_grad, ref_grad)


def test_token_logps_closed_form_masked_vocabulary_and_bf16():
    logits = torch.randn(10, 9, generator=gen(15))
    tokens = torch.randint(0, 4, (10,), generator=gen(16))
    logits[:, 6:] = float("-inf")  # never-sampled, masked entries
    for dtype, tol in ((torch.float32, {}), (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))):
        x = logits.to(dtype).requires_grad_(True)
        upstream = torch.randn(10, generator=gen(17))
        ref = _plain_token_logps(x, tokens, 1.0)
        (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), x)
        got = losses.token_logps(x, tokens, chunk_size=3)
        (got_grad,) = torch.autograd.grad((got * upstream).sum(), x)
        assert got.dtype == torch.float32 and got_grad.dtype == dtype
        torch.testing.assert_close(got, ref, **tol)
        torch.testing.assert_close(got_grad, ref_grad, **tol)
        assert torch.isfinite(got_grad).all()


def test_token_logps_without_grad_matches_and_keeps_no_graph():
    logits = torch.randn(4, 5, 8, generator=gen(18))
    tokens = torch.randint(0, 8, (4, 5), generator=gen(19))
    got = losses.token_logps(logits, tokens, 0.9, chunk_size=3)
    assert not got.requires_grad
    torch.testing.assert_close(got, _plain_token_logps(logits, tokens, 0.9))
    assert losses.token_logps(logits[:0], tokens[:0]).shape == (0, 5)


def test_lens_jsd_closed_form_denormal_probabilities_contribute_nothing():
    """A student entry at about -103.5 nats (a denormal probability) beside a teacher entry of 0:
    M can underflow to 0 there; the term is ~1e-45 and must come out as 0, not inf or NaN."""
    teacher = torch.tensor([[0.0, 5.0, float("-inf")], [1.0, 2.0, 3.0]])
    student = torch.tensor([[0.0, 5.0, -98.0], [1.0, 2.5, 3.0]], requires_grad=True)
    ref = losses.jsd(teacher, student)
    (ref_grad,) = torch.autograd.grad(ref.sum(), student)
    got = losses.StudentJSD.apply(teacher, student, 0.5, 1.0)
    (got_grad,) = torch.autograd.grad(got.sum(), student)
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_grad, ref_grad)
