"""`losses.lens_divergences` (one student log-softmax for KL, JSD and entropy) against the plain
`kl_from_logits`, `jsd` and `entropy_from_logits`, and a hand-computed two-token case."""

from __future__ import annotations

import math

import pytest
import torch

from oisd_lab import losses


def _plain(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (losses.kl_from_logits(teacher, student), losses.jsd(teacher, student),
            losses.entropy_from_logits(student))


def _fused(teacher: torch.Tensor, student: torch.Tensor, pass_p: bool = True) -> tuple[torch.Tensor, ...]:
    logp = torch.log_softmax(teacher, dim=-1)
    return losses.lens_divergences(logp, student, logp.exp() if pass_p else None)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    n, V = 12, 4099
    t, s = torch.randn(n, V, generator=g) * 3, torch.randn(n, V, generator=g) * 3
    masked_t, masked_s = t.clone(), s.clone()
    masked_t[:, :40] = -math.inf  # vocabulary masked in both
    masked_s[:, :40] = -math.inf
    masked_t[:4, 40:90] = -math.inf  # only the teacher: P = 0 where Q > 0
    masked_s[4:8, 90:140] = -math.inf  # only the student, where P is 0 by underflow
    masked_t[4:8, 90:140] = -200.0
    peaked = t.clone()
    peaked[:, 7] += 150.0  # P nearly one-hot: most of P underflows to 0
    return {"random": (t, s), "identical rows": (t, t.clone()), "masked": (masked_t, masked_s),
            "peaked teacher": (peaked, s), "peaked student": (s, peaked),
            "batched [2, 6, V]": (t.view(2, 6, V), s.view(2, 6, V))}


@pytest.mark.parametrize("name", list(_cases()))
@pytest.mark.parametrize("pass_p", [True, False])
def test_lens_divergences_match_the_plain_functions(name, pass_p):
    teacher, student = _cases()[name]
    for got, want in zip(_fused(teacher, student, pass_p), _plain(teacher, student), strict=True):
        assert got.shape == teacher.shape[:-1]
        _close(got, want)


def test_identical_rows_give_zero_kl_and_jsd():
    teacher, student = _cases()["identical rows"]
    kl, div, entropy = _fused(teacher, student)
    assert (kl.abs() < 1e-5).all() and (div >= 0).all() and (div < 1e-6).all()
    _close(entropy, losses.entropy_from_logits(teacher))


def test_infinite_kl_where_the_student_gives_zero_to_a_teacher_token():
    teacher, student = torch.zeros(1, 3), torch.tensor([[0.0, 0.0, -math.inf]])
    kl, div, entropy = _fused(teacher, student)
    assert torch.isinf(kl).all() and torch.isinf(losses.kl_from_logits(teacher, student)).all()
    _close(div, losses.jsd(teacher, student))
    _close(entropy, torch.tensor([math.log(2.0)]))


def test_two_token_case_by_hand():
    # P = (1, 0), Q = (1/2, 1/2), M = (3/4, 1/4).
    kl, div, entropy = _fused(torch.tensor([[0.0, -math.inf]]), torch.zeros(1, 2))
    want_jsd = 0.5 * math.log(4 / 3) + 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    _close(kl, torch.tensor([math.log(2.0)]))
    _close(div, torch.tensor([want_jsd]))
    _close(entropy, torch.tensor([math.log(2.0)]))


def test_inputs_are_left_unchanged():
    teacher, student = _cases()["masked"]
    logp = torch.log_softmax(teacher, dim=-1)
    p, logp_before, student_before = logp.exp(), logp.clone(), student.clone()
    losses.lens_divergences(logp, student, p)
    assert torch.equal(logp, logp_before) and torch.equal(student, student_before)
    assert torch.equal(p, logp_before.exp())
