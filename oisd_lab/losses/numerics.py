"""Numerics shared by the losses: log-probabilities of chosen tokens and token entropies over
the vocabulary, in chunks and in float32 (bf16/fp16 log-softmax over a large vocabulary loses
several digits), and the bound on log-ratios. Part of `oisd_lab.losses`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

LOG_RATIO_CLAMP = 20.0  # verl's bound on log(pi/pi_old); e^20 is far past any clip range


def upcast(x: Tensor) -> Tensor:
    """`x` in float32 when it is bf16 or fp16 (a log-softmax over a 150k vocabulary in half
    precision loses several digits), else `x` itself."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# --------------------------------------------------------------------------- log-probs


def _logps_chunk(logits: Tensor, index: Tensor, temperature: float) -> Tensor:
    logits = upcast(logits)
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class _TokenLogps(torch.autograd.Function):
    """log softmax(z / T)[index] over rows of [n, V] logits, block by block, with a hand-written
    backward: d logp_i / d z_iv = (1[v = index_i] - softmax(z_i / T)_v) / T.

    Forward keeps only the [n] log-normalisers; backward recomputes each block's softmax from
    them (one exp) and writes straight into one [n, V] gradient, so neither pass holds more than
    a [block, V] temporary and no autograd graph of the block's ops is built or replayed.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, temperature: float, block: int) -> Tensor:
        out, lse = [], []
        for lg, ix in zip(logits.split(block), index.split(block), strict=True):
            z = upcast(lg) / temperature if temperature != 1.0 else upcast(lg)
            lse.append(torch.logsumexp(z, dim=-1))
            out.append(z.gather(-1, ix.unsqueeze(-1)).squeeze(-1) - lse[-1])
        ctx.save_for_backward(logits, index, torch.cat(lse))
        ctx.temperature, ctx.block = temperature, block
        return torch.cat(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, index, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_out / ctx.temperature  # [n]
        for lo in range(0, logits.shape[0], ctx.block):
            rows = slice(lo, lo + ctx.block)
            z = upcast(logits[rows])
            z = z / ctx.temperature if ctx.temperature != 1.0 else z
            g = (z - lse[rows, None]).exp_()  # softmax(z / T), a fresh [block, V] tensor
            g.mul_(-scale[rows, None]).scatter_add_(-1, index[rows, None], scale[rows, None])
            grad[rows] = g
        return grad, None, None, None


def chunked_logps(logits: Tensor, index: Tensor, chunk_size: int, temperature: float) -> Tensor:
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and index {tuple(index.shape)} disagree")
    flat, flat_index = logits.reshape(-1, logits.shape[-1]), index.reshape(-1)
    if flat.shape[0] == 0:
        return upcast(flat).new_zeros(index.shape)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenLogps.apply(flat, flat_index, float(temperature), chunk_size).reshape(index.shape)
    pieces = [_logps_chunk(lg, ix, temperature)
              for lg, ix in zip(flat.split(chunk_size), flat_index.split(chunk_size), strict=True)]
    return torch.cat(pieces).reshape(index.shape)


def selective_log_softmax(logits: Tensor, index: Tensor, chunk_size: int = 512) -> Tensor:
    """log softmax(logits)[index] without materialising the full log-softmax.

    logits [..., V], index [...] (int64) -> [...]. Mirrors TRL `selective_log_softmax`
    (gather minus logsumexp), in chunks of `chunk_size` rows. 16-bit logits are computed and
    returned in float32 (TRL's bf16 path loses precision in the importance ratio).
    """
    return chunked_logps(logits, index, chunk_size, 1.0)


def token_logps(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = 512
) -> Tensor:
    """Per-token log-probs of sampled tokens, logits divided by the sampling temperature first.

    logits [B, T, V] already aligned so that logits[:, t] predicts tokens[:, t]; tokens [B, T]
    -> [B, T]. TRL `_get_per_token_logps` convention; the division happens per chunk, so no
    second [B, T, V] tensor is created.
    """
    return chunked_logps(logits, tokens, chunk_size, float(temperature))


def entropy_from_logits(logits: Tensor, chunk_size: int = 512, temperature: float = 1.0) -> Tensor:
    """Entropy H(softmax(logits / temperature)) in nats over the last dim. logits [..., V] -> [...].

    Mirrors TRL `entropy_from_logits` (chunked log-softmax); 0 log 0 = 0, so -inf logits are safe.
    The division happens per chunk (no second [..., V] tensor). Meant for metrics (call under
    `torch.no_grad()`).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    pieces = []
    for chunk in flat.split(chunk_size):
        chunk = upcast(chunk)
        logp = F.log_softmax(chunk / temperature if temperature != 1.0 else chunk, dim=-1)
        p = logp.exp()
        pieces.append(-torch.where(p > 0, p * logp, 0.0).sum(-1))
    if not pieces:
        return upcast(flat).new_zeros(logits.shape[:-1])
    return torch.cat(pieces).reshape(logits.shape[:-1])
