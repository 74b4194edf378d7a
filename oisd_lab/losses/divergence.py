"""The divergences of the OISD channels: the JSD and KL between two sets of logits, the logit
lens's divergences to the final layer (chunked over tokens, with a closed-form student gradient,
recomputed in backward above `LENS_CHECKPOINT_MIN_ELEMENTS`, a setting of the package), the
fused pass over the vocabulary that gives log-probs, entropy and every student's lens JSD
(`chunked_head`), and the attention rows' JSD and cosine. Part of `oisd_lab.losses`; the method is
in docs/oisd-method.md."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ..options import HEAD_AGG, HEAD_REDUCE
from .numerics import chunked_logps, entropy_from_logits, upcast


def _checkpoint_threshold() -> int:
    """`losses.LENS_CHECKPOINT_MIN_ELEMENTS`, read from the package when it is used, so that a
    value set there takes effect."""
    # deferred: the package imports this module while it is being built
    from .. import losses

    return losses.LENS_CHECKPOINT_MIN_ELEMENTS


# --------------------------------------------------------------------------- divergences


def _degenerate_beta(beta: float) -> bool:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"JSD beta must lie in [0, 1], got {beta}")
    return beta == 0.0 or beta == 1.0


def _zeros_like_rows(x: Tensor) -> Tensor:
    # A zero that backward() accepts even when it is the whole loss.
    return upcast(x).new_zeros(x.shape[:-1]).requires_grad_(x.requires_grad)


def _kl_from_logps(log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum_v a (log a - log b) over the last dim, with 0 log 0 = 0 and zero gradient there."""
    a = log_a.exp()
    # where on the difference (not on the product) keeps -inf - -inf out of the backward pass.
    diff = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * diff).sum(-1)


def _finite_log_softmax(logits: Tensor, temperature: float) -> Tensor:
    logp = F.log_softmax(upcast(logits) / temperature, dim=-1)
    # -inf (masked vocabulary) becomes the most negative float: logaddexp of two -inf has a NaN
    # gradient, and no finite log-prob is changed (its probability underflows to 0 long before).
    return logp.clamp(min=torch.finfo(logp.dtype).min)


def jsd(p_logits: Tensor, q_logits: Tensor, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Generalised Jensen-Shannon divergence in nats, per position. [..., V] x2 -> [...].

    P = softmax(p_logits / temperature) is the teacher, Q = softmax(q_logits / temperature) the
    student; M = beta P + (1 - beta) Q and
        JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M),
    computed in log space: log M = logaddexp(log beta + log P, log(1 - beta) + log Q).
    Mirrors TRL `GKDTrainer.generalized_jsd_loss` (same M), except beta in {0, 1} returns 0 (the
    continuous limit; TRL switches to a plain KL there). beta = 0.5 is symmetric and <= ln 2.
    Gradients flow to both inputs: detach the teacher at the call site (as `chunked_lens_jsd`
    does). 16-bit inputs are computed in float32. Rounding negatives are clamped to 0.
    """
    if _degenerate_beta(beta):
        return _zeros_like_rows(q_logits)
    logp, logq = (
        _finite_log_softmax(p_logits, temperature),
        _finite_log_softmax(q_logits, temperature),
    )
    log_m = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    div = beta * _kl_from_logps(logp, log_m) + (1.0 - beta) * _kl_from_logps(logq, log_m)
    # Rounding in log M leaves ~1e-8 of either sign when P == Q; JSD >= 0, and a negative value
    # would flip the push/pull meaning of signed weighting.
    return div.clamp(min=0.0)


def kl_from_logits(p_logits: Tensor, q_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(P || Q) in nats per position, P = softmax(p_logits / T), Q = softmax(q_logits / T).

    [..., V] x2 -> [...]. Used for the per-layer KL(p_L || p_k) metric (docs/oisd-method.md, section 4).
    """
    logp = F.log_softmax(upcast(p_logits) / temperature, dim=-1)
    logq = F.log_softmax(upcast(q_logits) / temperature, dim=-1)
    return _kl_from_logps(logp, logq)



def lens_divergences(teacher_logp: Tensor, student_logits: Tensor, teacher_p: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """KL(P || Q), JSD(P, Q) (beta = 0.5) and H(Q) in nats per row, from one log-softmax of the student.

    teacher_logp [..., V]: log P, already log-softmaxed (computed once and shared by every student);
    teacher_p: its exp, optional, for the same reason; student_logits [..., V] -> three [...] tensors.
    With log Q = log_softmax(student_logits) (temperature 1) and S = P + Q:
        KL  = sum_v P (log P - log Q)                                    (`kl_from_logits`)
        JSD = ln 2 + 1/2 sum_v [P (log P - log S) + Q (log Q - log S)]   (`jsd`, beta = 0.5, >= 0)
        H   = -sum_v Q log Q                                             (`entropy_from_logits`)
    (log M = log S - ln 2 with sum P = sum Q = 1.) log S from the probabilities is finite wherever
    P or Q is positive, so every NaN term is a 0 log 0 (zero probability, -inf or underflowed logit)
    and is summed as 0; KL stays +inf where P > 0 = Q, as `kl_from_logits`. float32 or wider;
    no gradient (metrics: call under `torch.no_grad()`); temporaries are reused in place.
    """
    logq = F.log_softmax(upcast(student_logits), dim=-1)
    p = teacher_logp.exp() if teacher_p is None else teacher_p
    q = logq.exp()
    buf = torch.mul(q, logq)
    entropy = -buf.nansum(-1)
    kl = torch.sub(teacher_logp, logq, out=buf).mul_(p).nansum(-1)
    log_s = torch.add(p, q).log_()
    # Two sums, not one of the added terms: a 0 log 0 of P must not hide Q's term at that entry.
    p_terms = torch.sub(teacher_logp, log_s, out=buf).mul_(p).nansum(-1)
    div = logq.sub_(log_s).mul_(q).nansum(-1).add_(p_terms).mul_(0.5).add_(math.log(2.0))
    # Rounding leaves ~1e-7 of either sign when P == Q; JSD >= 0 (as `jsd` clamps).
    return kl, div.clamp_(min=0.0), entropy

_FIRST_FORWARD = contextvars.ContextVar("checkpointed_first_forward", default=False)
"""True inside the first forward of a chunk run under activation checkpointing: whatever that
forward saves for backward is discarded and formed again when backward recomputes the chunk."""


@contextlib.contextmanager
def _first_forward():
    token = _FIRST_FORWARD.set(True)
    try:
        yield
    finally:
        _FIRST_FORWARD.reset(token)


def _checkpointed(fn: Callable, *args: Tensor):
    """`fn(*args)` under non-reentrant activation checkpointing, its first forward marked (see
    `StudentJSD`); backward's recomputation runs unmarked."""
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (_first_forward(), contextlib.nullcontext()))


class StudentJSD(torch.autograd.Function):
    """JSD_beta(P || Q) per row (as `jsd`), whose gradient w.r.t. the student logits is formed in
    the forward pass, in closed form, instead of by autograd through a dozen [n, V] ops.

    With Q = softmax(q / T) and M = beta P + (1 - beta) Q, d JSD / d Q_v = (1 - beta) log(Q_v / M_v)
    (the log terms of P and Q through M cancel against the +1), so through the softmax
        d JSD / d q_v = (1 - beta) / T * Q_v * (log(Q_v / M_v) - KL(Q || M)).
    It is zeroed where `jsd` clamps a rounding negative to 0 (clamp passes gradient at >= 0).
    Saves that one [n, V] gradient; backward scales it by the upstream gradient. In the first
    forward of a checkpointed chunk (`_checkpointed`) the gradient is not formed: checkpointing
    discards what that forward saves, and backward's recomputation forms it. A tensor of the
    gradient's shape and dtype is saved in its place, so the recomputation saves the same.
    """

    @staticmethod
    def forward(ctx, teacher: Tensor, student: Tensor, beta: float, temperature: float) -> Tensor:
        logp, logq = _log_softmax_at(teacher, temperature), _log_softmax_at(student, temperature)
        p, q = logp.exp(), logq.exp()
        # log M from the probabilities (one log instead of logaddexp). Terms of probability 0
        # (-inf logits, or M underflowing next to a denormal) come out as NaN or inf and are 0.
        log_m = torch.add(p, q, alpha=(1.0 - beta) / beta).mul_(beta).log_()
        kl_p = _zero_nonfinite(logp.sub_(log_m).mul_(p)).sum(-1)
        q_terms = _zero_nonfinite(logq.sub_(log_m).mul_(q))  # Q log(Q / M), in logq's buffer
        kl_q = q_terms.sum(-1)
        raw = beta * kl_p + (1.0 - beta) * kl_q
        if ctx.needs_input_grad[1]:
            grad = q if _FIRST_FORWARD.get() else _closed_form_grad(q, q_terms, kl_q, raw, beta, temperature)
            ctx.save_for_backward(grad)
            ctx.student_dtype = student.dtype
        return raw.clamp(min=0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return None, (grad * grad_out[:, None]).to(ctx.student_dtype), None, None


def _closed_form_grad(q: Tensor, q_terms: Tensor, kl_q: Tensor, raw: Tensor, beta: float, temperature: float
                      ) -> Tensor:
    """d JSD / d student logits (`StudentJSD`): scale * (Q log(Q / M) - Q KL(Q || M)), formed in
    place in the buffer of `q_terms` (Q log(Q / M), its 0-probability terms already 0; Q is finite)."""
    scale = ((1.0 - beta) / temperature) * (raw >= 0).to(q.dtype)  # [n]
    return q_terms.addcmul_(q, kl_q[:, None], value=-1.0).mul_(scale[:, None])


def _log_softmax_at(logits: Tensor, temperature: float) -> Tensor:
    z = upcast(logits)
    return F.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)


def _zero_nonfinite(x: Tensor) -> Tensor:
    """In place: NaN and +-inf -> 0 (the terms of `StudentJSD` whose probability is 0)."""
    return x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _lens_jsd_rows(teacher: Tensor, student: Tensor, beta: float, temperature: float) -> Tensor:
    """`jsd(teacher.detach(), student)` for [n, V] rows: the closed-form gradient when it applies."""
    if _degenerate_beta(beta) or student.dim() != 2:
        return jsd(teacher.detach(), student, beta=beta, temperature=temperature)
    return StudentJSD.apply(teacher.detach(), student, beta, float(temperature))


def chunked_lens_jsd(
    student_hidden: Tensor,
    teacher_logits: Tensor,
    readout: Callable[[Tensor], Tensor],
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    teacher_index: tuple[Tensor, ...] | None = None,
) -> Tensor:
    """OISD logit alignment d_t = JSD_beta(sg[p_L] || softmax(readout(h_l))) per token, chunked.

    student_hidden [N, D]: completion-token hidden states of the student layer (NOT final-normed);
    teacher_logits [N, V]: final-layer logits at the same tokens (detached here), or [..., V]
    with `teacher_index`;
    readout: [n, D] -> [n, V], the model's final norm + unembedding (the logit lens; pass a
    readout with detached weights for lens_grad="hidden_only"). Returns [N] with gradient to
    student_hidden and to readout's parameters. Values and gradients are those of `jsd` on the
    whole [N, V] (the gradient w.r.t. the student logits in closed form, see `StudentJSD`).
    teacher_index: when given, the teacher rows are `teacher_logits[teacher_index]` (e.g. the
    boolean mask's `nonzero(as_tuple=True)` over [B, T, V] logits), gathered one chunk at a time
    inside the checkpointed function, so no [N, V] copy of the teacher is ever made.
    Above `LENS_CHECKPOINT_MIN_ELEMENTS` of [N, V] work, each chunk of `chunk_size` tokens runs
    under non-reentrant activation checkpointing, so at most one [chunk, V] block of student
    logits is alive in forward and in backward; below it nothing is recomputed.
    """
    teacher_logits = teacher_logits.detach()
    if teacher_index is None:
        teacher_index = (torch.arange(teacher_logits.shape[0], device=teacher_logits.device),)
    if student_hidden.shape[0] != teacher_index[0].shape[0]:
        raise ValueError(
            f"student_hidden has {student_hidden.shape[0]} tokens, teacher_logits {teacher_index[0].shape[0]}"
        )

    def lens_chunk(h: Tensor, *index: Tensor) -> Tensor:
        return _lens_jsd_rows(teacher_logits[index], readout(h), beta, temperature)

    use_ckpt = torch.is_grad_enabled() and student_hidden.shape[0] * teacher_logits.shape[-1] > \
        _checkpoint_threshold()
    pieces = [
        _checkpointed(lens_chunk, h, *index)
        if use_ckpt
        else lens_chunk(h, *index)
        for h, *index in zip(
            student_hidden.split(chunk_size), *(i.split(chunk_size) for i in teacher_index), strict=True
        )
    ]
    if not pieces:
        return _zeros_like_rows(student_hidden)
    return torch.cat(pieces)


class HeadOutputs(NamedTuple):
    """What `chunked_head` returns, one entry per selected token: log-probs [N] (with gradient
    when the policy's inputs have one), the entropy [N] of the final distribution (detached; None
    when not asked for) and one lens JSD [N] per student (with gradient to the student)."""

    logps: Tensor
    entropy: Tensor | None
    lens_jsd: tuple[Tensor, ...]


def chunked_head(
    final_hidden: Tensor,
    tokens: Tensor,
    head: Callable[[Tensor], Tensor],
    vocab: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    students: tuple[tuple[Tensor, Callable[[Tensor], Tensor]], ...] = (),
    jsd_beta: float = 0.5,
    jsd_temperature: float = 1.0,
    policy: tuple[Tensor, Callable[[Tensor], Tensor]] | None = None,
    entropy: bool = True,
    entropy_grad: bool = False,
) -> HeadOutputs:
    """Everything the step needs from the vocabulary, straight from hidden states, chunk by chunk.

    final_hidden [N, D]: the final-normed hidden states at N selected tokens; tokens [N]: the token
    each position predicts; head: [n, D] -> [n, V], the unembedding and the model's logit
    post-processing (so head(final_hidden) are the model's logits).
    Per chunk of `chunk_size` rows, the final logits are formed once and give
      logps   = log softmax(logits / temperature)[tokens]            (`token_logps`)
      entropy = H(softmax(logits / temperature)), detached           (`entropy_from_logits`)
      lens_jsd[i] = JSD_beta(sg[p_L] || softmax(readout_i(h_i)))     (`chunked_lens_jsd`)
    for each student (h_i [N, D], readout_i) in `students`: the teacher of the logit channel is
    the policy's own chunk, not a second pass. `policy` = (h [N, D], readout) reads the log-probs
    from that readout instead (an internal policy); the final logits are then formed without a
    graph, as teacher and for the entropy only. `entropy_grad`: the entropy keeps its gradient
    (an entropy bonus in the loss; final-layer policy only).

    No [N, V] tensor is kept: above `LENS_CHECKPOINT_MIN_ELEMENTS` of N x `vocab` work with a
    gradient, each chunk runs under non-reentrant activation checkpointing, so backward recomputes
    one chunk's logits at a time (one more unembedding forward per chunk); below it, each chunk
    keeps its own graph and nothing is recomputed. Values and gradients are those of the plain
    functions on whole [N, V] logits, to float32 rounding.
    """
    student_h = tuple(h for h, _ in students)
    readouts = tuple(r for _, r in students)
    extra = (policy[0],) if policy is not None else ()

    entropies: dict[int, Tensor] = {}

    if entropy_grad and (policy is not None or not entropy):
        raise ValueError("entropy_grad needs entropy=True and the final layer as the policy")

    def run(i: int, h: Tensor, tok: Tensor, *hs: Tensor) -> tuple[Tensor, ...]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and policy is None):
            logits = head(h)
        if policy is None:
            logps = chunked_logps(logits, tok, max(1, tok.shape[0]), float(temperature))
        else:
            logps = chunked_logps(policy[1](hs[-1]), tok, max(1, tok.shape[0]), float(temperature))
        teacher = logits.detach()
        out = [logps]
        if entropy_grad:  # with its graph: recomputed with the chunk like the log-probs
            out.append(entropy_from_logits(logits, chunk_size=max(1, tok.shape[0]), temperature=temperature))
        elif entropy and i not in entropies:  # once: not again when backward recomputes the chunk
            with torch.no_grad():
                entropies[i] = entropy_from_logits(teacher, chunk_size=max(1, tok.shape[0]), temperature=temperature)
        return (*out, *(_lens_jsd_rows(teacher, readout(hi), jsd_beta, jsd_temperature)
                        for hi, readout in zip(hs[: len(readouts)], readouts, strict=True)))

    inputs = (final_hidden, *student_h, *extra)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    use_ckpt = grad and final_hidden.shape[0] * vocab > _checkpoint_threshold()
    splits = [x.split(chunk_size) for x in (final_hidden, tokens, *student_h, *extra)]
    pieces = [_checkpointed(run, i, *chunk) if use_ckpt else run(i, *chunk)
              for i, chunk in enumerate(zip(*splits, strict=True))]
    if not pieces:
        empty = upcast(final_hidden).new_zeros(0)
        return HeadOutputs(empty, empty if entropy else None, tuple(empty for _ in students))
    columns = [torch.cat(col) for col in zip(*pieces, strict=True)]
    if entropy_grad:
        return HeadOutputs(columns[0], columns[1], tuple(columns[2:]))
    ent = torch.cat([entropies[i] for i in range(len(pieces))]) if entropy else None
    return HeadOutputs(columns[0], ent, tuple(columns[1:]))


# --------------------------------------------------------------------------- attention


def _attention_rows(
    attn: Tensor, key_mask: Tensor | None, exclude_sink: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """Zero dropped keys and renormalise rows. attn [B, h, T, S] -> (rows [B, h, T, S], ok [B, h, T]).

    The sink is the first real key of each row: prompts are left-padded, so on shorter rows key 0
    is padding and the sink sits further right (key 0 when there is no key_mask)."""
    keep = torch.ones(attn.shape[-1], dtype=torch.bool, device=attn.device)
    if key_mask is not None:
        keep = key_mask.bool()  # [B, S]
    if exclude_sink:
        first = keep.int().argmax(-1, keepdim=True) if keep.dim() == 2 else 0  # [B, 1]: first True
        keep = keep & (torch.arange(attn.shape[-1], device=attn.device) != first)
    if keep.dim() == 2:
        keep = keep[:, None, None, :]  # [B, S] -> [B, 1, 1, S]
    rows = torch.where(keep, attn, 0.0)
    mass = rows.sum(-1, keepdim=True)
    ok = mass > eps
    # Renormalising also absorbs bf16 rounding of rows that were already distributions.
    rows = torch.where(ok, rows / torch.where(ok, mass, 1.0), 0.0)
    return rows, ok.squeeze(-1)


def _xlog_ratio(a: Tensor, b: Tensor) -> Tensor:
    """sum_s a log(a / b) over the last dim for probabilities, 0 log 0 = 0 with finite gradients."""
    pos = a > 0
    # Both logs see 1 where a == 0 so that neither value nor gradient can become NaN.
    safe_a, safe_b = torch.where(pos, a, 1.0), torch.where(pos, b, 1.0)
    return torch.where(pos, a * (safe_a.log() - safe_b.log()), 0.0).sum(-1)


def _prob_jsd(p: Tensor, q: Tensor, beta: float) -> Tensor:
    m = beta * p + (1.0 - beta) * q  # positive wherever p or q is, since 0 < beta < 1
    return (beta * _xlog_ratio(p, m) + (1.0 - beta) * _xlog_ratio(q, m)).clamp(
        min=0.0
    )  # as in `jsd`


def attention_row_jsd(
    teacher_attn: Tensor,
    student_attn: Tensor,
    query_mask: Tensor,
    key_mask: Tensor | None = None,
    head_reduce: str = "mean",
    exclude_sink: bool = False,
    beta: float = 0.5,
    eps: float = 1e-12,
    head_agg: str = "mean",
) -> Tensor:
    """OISD attention alignment: JSD_beta(sg[a_L(t, :)] || a_l(t, :)) per query row. -> [B, T].

    teacher_attn, student_attn: [B, H, T, S] post-softmax probabilities (rows over keys; the
    teacher is detached here). query_mask [B, T] bool: rows outside it give 0. key_mask [B, S]
    bool (False = padding): those keys are zeroed and rows renormalised. exclude_sink drops the
    first real key of each row (the attention sink: key 0 only on unpadded rows) and renormalises;
    a row with no remaining mass (<= eps) gives 0.
    head_reduce `mean`: average the H rows, then one JSD per row (the paper's default reading);
    `per_head`: JSD of student head i against teacher head i; `per_head_to_mean`: JSD of each
    student head against the teacher's head mean (pairing head i with head i across layers is
    arbitrary). Joint convexity of JSD makes the head mean of `per_head` >= `mean` when the heads
    of each side keep equal mass after key_mask and exclude_sink (renormalising then commutes with
    the head mean): always without exclude_sink on a real layer's rows, whose padding keys hold no
    mass. exclude_sink renormalises each head by its own non-sink mass, and `per_head` can then
    fall below `mean`.
    head_agg: `mean` or `sum` of the per-head JSDs (sum = H x mean; one row under `mean`).
    Computed on probabilities with 0 log 0 = 0; beta in {0, 1} gives 0, as in `jsd`.
    """
    if head_reduce not in HEAD_REDUCE:
        raise ValueError(f"unknown head_reduce {head_reduce!r}; choose one of {HEAD_REDUCE}")
    if head_agg not in HEAD_AGG:
        raise ValueError(f"unknown head_agg {head_agg!r}; choose one of {HEAD_AGG}")
    query_mask = query_mask.bool()
    if _degenerate_beta(beta):
        return torch.zeros(query_mask.shape, device=query_mask.device).requires_grad_(
            student_attn.requires_grad
        )
    teacher, student = upcast(teacher_attn.detach()), upcast(student_attn)
    if head_reduce != "per_head":
        teacher = teacher.mean(1, keepdim=True)  # [B, 1, T, S], broadcast against student heads
    if head_reduce == "mean":
        student = student.mean(1, keepdim=True)
    teacher, teacher_ok = _attention_rows(teacher, key_mask, exclude_sink, eps)
    student, student_ok = _attention_rows(student, key_mask, exclude_sink, eps)
    div = torch.where(teacher_ok & student_ok, _prob_jsd(teacher, student, beta), 0.0)  # [B, h, T]
    div = div.sum(1) if head_agg == "sum" else div.mean(1)
    return torch.where(query_mask, div, 0.0)


def attention_cosine(
    teacher_attn: Tensor,
    student_attn: Tensor,
    query_mask: Tensor,
    key_mask: Tensor | None = None,
    exclude_sink: bool = False,
    eps: float = 1e-12,
) -> Tensor:
    """Cosine similarity of head-mean attention rows (a diagnostic). [B, H, T, S] x2 -> [B, T].

    Keys dropped by key_mask / exclude_sink are zeroed (cosine ignores renormalisation);
    rows outside query_mask, or with no remaining mass, give 0.
    """
    teacher = upcast(teacher_attn.detach()).mean(1, keepdim=True)  # [B, 1, T, S]
    student = upcast(student_attn).mean(1, keepdim=True)
    teacher, _ = _attention_rows(teacher, key_mask, exclude_sink, eps)
    student, _ = _attention_rows(student, key_mask, exclude_sink, eps)
    dot = (teacher * student).sum(-1)
    norms = (teacher.norm(dim=-1) * student.norm(dim=-1)).clamp(min=eps)
    return torch.where(query_mask.bool(), (dot / norms).squeeze(1), 0.0)
