"""The gradient view: what each loss term does to the update, measured on logging steps.

A loss value says little about its gradient: under signed weighting the part of a channel's
gradient that a group's rollouts share cancels (advantages sum to zero), so a near-zero loss can
carry a large or a small gradient (docs/oisd-method.md, section 5). On logging steps the module
takes each weighted term's gradient with `torch.autograd.grad` on the same forward (the graph
is retained until the ordinary backward), summed over micro-batches, and logs under `grad/`:

- `grad/<term>/norm`: the norm of the term's contribution to the update (weight and schedule
  included), over all parameters (parameters it cannot reach contribute 0);
- `grad/<term>/reach`: the fraction of parameter elements the term can reach (autograd returns
  no gradient for the others, e.g. the readout under `lens_grad=hidden_only`);
- for each alignment term: `share` = its norm / the policy gradient's norm, `share_reach` =
  the same against the policy gradient restricted to the parameters the term reaches, and
  `cos_policy`, its cosine with the policy gradient;
- `grad/<channel>/div_<sign>`: the unweighted mean per-token divergence of the channel on
  rollouts with positive, negative and zero advantage;
- `grad/cov_adv_length` (covariance of advantage and completion length: under `dapo` a
  rollout weighs by its length) and `grad/frac_zero_adv_groups`.
Cost, on logging steps only: one extra backward pass per alignment term (each reaches only the
layers up to the student and the readout) and one parameter-sized buffer per term. The policy
term's gradient is the accumulated `.grad` minus the alignment terms' (`derive_policy`), exact
when `.grad` holds this process's unscaled sum; under data parallelism or a loss scaler it gets
its own backward pass instead. Under data parallelism each rank's figures are taken from the
gradients averaged over ranks (as the update is); under FSDP the terms are differentiated
w.r.t. the gathered parameters, which stay gathered through the logging step's passes (the full
model per rank on logging steps only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .losses import ADVANTAGE_SIGNS

TERMS = ("policy", "think", "attn")
Grads = Sequence[Tensor | None]
"""One entry per parameter; None where the term cannot reach the parameter."""


# --------------------------------------------------------------------------- pure math


def grad_dot(a: Grads, b: Grads, where: Grads | None = None) -> float:
    """sum over parameters of <a_p, b_p>, over the parameters that `where` reaches (all if None);
    a None entry counts as zeros."""
    total = None  # summed on the gradients' device: one host sync per call, not per parameter
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x is None or y is None or (where is not None and where[i] is None):
            continue
        part = (x.double() * y.double()).sum()
        total = part if total is None else total + part.to(total.device)
    return 0.0 if total is None else float(total)


def grad_norm(a: Grads, where: Grads | None = None) -> float:
    """Euclidean norm of the concatenated gradients (restricted to `where`'s reach if given)."""
    return math.sqrt(grad_dot(a, a, where))


def grad_cosine(a: Grads, b: Grads) -> float:
    """Cosine <a, b> / (|a| |b|) of two concatenated gradients; 0 when either is zero."""
    denom = grad_norm(a) * grad_norm(b)
    return grad_dot(a, b) / denom if denom > 0 else 0.0


def reach_fraction(a: Grads, params: Sequence[Tensor]) -> float:
    """Fraction of parameter elements with a (possibly zero) gradient entry."""
    total = sum(p.numel() for p in params)
    return sum(p.numel() for g, p in zip(a, params, strict=True) if g is not None) / max(total, 1)


def advantage_length_cov(advantages: Tensor, lengths: Tensor) -> float:
    """Population covariance mean((A - mean A)(len - mean len)) over rollouts. [B] x [B] -> float.

    Positive: longer rollouts are the better ones; under `dapo` a rollout's tokens weigh by its
    length, so a negative value means the signed alignment pushes away from the teacher on net.
    """
    a, n = advantages.double(), lengths.double()
    return float(((a - a.mean()) * (n - n.mean())).mean())


def frac_zero_advantage_groups(advantages: Tensor, num_generations: int) -> float:
    """Fraction of prompt groups whose advantages are all exactly 0 (they carry no gradient)."""
    groups = advantages.reshape(-1, num_generations)
    return float((groups == 0).all(dim=1).float().mean())


# --------------------------------------------------------------------------- accumulation


class GradientView:
    """Per-term gradients of one optimisation step, summed over its micro-batches.

    `add(terms)` after each micro-batch's forward (before its backward): the weighted terms'
    gradients w.r.t. `params`; `finish(total)` with the accumulated `.grad` of `params` (before
    clipping); then `metrics(...)`. derive_policy: take the policy term's gradient as the total
    minus the alignment terms' instead of from its own backward pass.
    """

    def __init__(self, params: Sequence[Tensor], weights: Mapping[str, float], derive_policy: bool = False):
        self.params = list(params)
        self.weights = dict(weights)  # term -> its weight in the total (policy 1)
        self.derive_policy = derive_policy
        self.grads: dict[str, list[Tensor | None]] = {}
        self.seconds = 0.0

    def add(self, terms: Mapping[str, Tensor]) -> None:
        start = time.perf_counter()
        for name in TERMS:
            loss = terms.get(f"loss/{name}")
            if loss is None or not loss.requires_grad or not self.weights.get(name):
                continue
            if name == "policy" and self.derive_policy:
                continue
            grads = torch.autograd.grad(self.weights[name] * loss, self.params, retain_graph=True,
                                        allow_unused=True)
            seen = self.grads.setdefault(name, [None] * len(self.params))
            for i, g in enumerate(grads):
                if g is not None:
                    seen[i] = g.detach() if seen[i] is None else seen[i] + g.detach()
        self.seconds += time.perf_counter() - start

    def finish(self, total: Grads) -> None:
        """With derive_policy: policy = total - sum of the alignment terms, per parameter."""
        if not self.derive_policy:
            return
        policy = []
        for i, g in enumerate(total):
            others = [grads[i] for grads in self.grads.values() if grads[i] is not None]
            policy.append(None if g is None else (g.detach() - sum(others) if others else g.detach()))
        self.grads = {"policy": policy, **self.grads}

    def average_over_ranks(self) -> None:
        """Each term's gradient averaged over the process group (a collective: every rank calls it),
        as DDP and FSDP average `.grad`, in place; a parameter that no rank reached stays None."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        device = self.params[0].device  # NCCL reduces device tensors only
        for name in TERMS:  # the same order on every rank
            grads = self.grads.get(name)
            present = torch.tensor([0.0 if grads is None else 1.0], device=device)
            dist.all_reduce(present)
            if present.item() == 0:
                continue
            grads = grads or [None] * len(self.params)
            reached = torch.tensor([0.0 if g is None else 1.0 for g in grads], device=device)
            dist.all_reduce(reached)
            out: list[Tensor | None] = []
            for g, p, hit in zip(grads, self.params, reached.tolist(), strict=True):
                if hit == 0:
                    out.append(None)
                    continue
                # in place and in the gradient's own dtype: no second model-sized copy per term
                g = torch.zeros(p.shape, dtype=p.dtype, device=device) if g is None else g.detach()
                dist.all_reduce(g)
                out.append(g.div_(world))
            self.grads[name] = out

    def metrics(self, stats: Mapping[str, Tensor], advantages: Tensor, lengths: Tensor,
                num_generations: int) -> dict[str, float]:
        out: dict[str, float] = {}
        policy = self.grads.get("policy")
        for name, grads in self.grads.items():
            out[f"grad/{name}/norm"] = grad_norm(grads)
            out[f"grad/{name}/reach"] = reach_fraction(grads, self.params)
            if name == "policy" or policy is None:
                continue
            whole, reach = grad_norm(policy), grad_norm(policy, where=grads)
            out[f"grad/{name}/share"] = out[f"grad/{name}/norm"] / whole if whole > 0 else 0.0
            out[f"grad/{name}/share_reach"] = out[f"grad/{name}/norm"] / reach if reach > 0 else 0.0
            out[f"grad/{name}/cos_policy"] = grad_cosine(grads, policy)
        out.update(divergence_means(stats))
        out["grad/cov_adv_length"] = advantage_length_cov(advantages, lengths)
        out["grad/frac_zero_adv_groups"] = frac_zero_advantage_groups(advantages, num_generations)
        out["time/gradient_view"] = self.seconds
        return out


def divergence_means(stats: Mapping[str, Tensor]) -> dict[str, float]:
    """`stat/<channel>/div_<s>` and `tokens_<s>` sums -> `grad/<channel>/div_<s>` means (splits
    with no tokens are left out)."""
    out = {}
    for key, total in stats.items():
        _, channel, what = key.split("/")
        if not what.startswith("div_"):
            continue
        sign = what[4:]
        tokens = float(stats[f"stat/{channel}/tokens_{sign}"])
        if sign in ADVANTAGE_SIGNS and tokens > 0:
            out[f"grad/{channel}/div_{sign}"] = float(total) / tokens
    return out
