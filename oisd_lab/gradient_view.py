"""The gradient view: what each loss term does to the update, measured on logging steps.

A loss value says little about its gradient: under signed weighting the part of a channel's
gradient that a group's rollouts share cancels (advantages sum to zero), so a near-zero loss can
carry a large or a small gradient (docs/oisd-method.md, section 5). On logging steps the module
takes each weighted term's gradient with `torch.autograd.grad` on the same forward (the graph
is retained until the ordinary backward), summed over micro-batches, and logs under `grad/`:

- `grad/<term>/norm`: the norm of the term's gradient (weight and schedule included), over all
  parameters (parameters it cannot reach contribute 0);
- `grad/<term>/reach`: the fraction of parameter elements the term can reach (autograd returns
  no gradient for the others, e.g. the readout under `lens_grad=hidden_only`);
- for each alignment term, against the policy gradient g_policy:
  `norm_ratio` = |g_term| / |g_policy|, a ratio of gradient norms: it can exceed 1 and it is not
  the term's fraction of the update; `norm_ratio_reach` = the same against g_policy restricted
  to the parameters the term reaches; `cos_policy` = cos(g_term, g_policy);
- the AdamW view (`adam_view`), for each alignment term, when the optimizer is Adam-family and
  has taken a step: `adam_norm_ratio` = |u_term| / |u_policy| and `adam_cos_policy` =
  cos(u_term, u_policy), with u = g / (sqrt(v_hat) + eps) each gradient preconditioned as AdamW
  divides it;
- `grad/<term>/cos_prev` (policy included): the cosine between the term's gradient on this
  gradient-view step and on the previous one (`PreviousGradients`);
- `grad/<channel>/div_<sign>`: the unweighted mean per-token divergence of the channel on
  rollouts with positive, negative and zero advantage;
- `grad/cov_adv_length` (covariance of advantage and completion length: under `dapo` a
  rollout weighs by its length) and `grad/frac_zero_adv_groups`.
Metrics logged before `norm_ratio` had its name call it `share` (and `share_reach`); the
analysis renames them on load (`oisd_lab.analysis.runs.current_metric_names`). How to read the
views: docs/oisd-method.md, "Reading the gradient view".
Cost, on logging steps only: one extra backward pass per alignment term (each reaches only the
layers up to the student and the readout) and one parameter-sized buffer per term; the AdamW
view works one parameter at a time, and `cos_prev` keeps a small sketch per term between
logging steps (on the default tiny model, 1.5M parameters, both together add about 0.1 s per
logging step on one CPU thread). The policy
term's gradient is the accumulated `.grad` minus the alignment terms' (`derive_policy`), exact
when `.grad` holds this process's unscaled sum; under data parallelism or a loss scaler it gets
its own backward pass instead. Under data parallelism each rank's figures are taken from the
gradients averaged over ranks (as the update is); under FSDP the terms are differentiated
w.r.t. the gathered parameters, which stay gathered through the logging step's passes (the full
model per rank on logging steps only), and the AdamW view takes each rank's rows of the second
moment where they are and all-reduces its sums.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .losses import ADVANTAGE_SIGNS
from .registry import ALIGNMENT_CHANNELS


def view_terms() -> tuple[str, ...]:
    """The loss terms the view separates: the policy loss, then each registered alignment channel."""
    return ("policy", *ALIGNMENT_CHANNELS.names())


Grads = Sequence[Tensor | None]
"""One entry per parameter; None where the term cannot reach the parameter."""


# --------------------------------------------------------------------------- pure math


CHUNK = 1 << 20
"""Elements of one parameter taken at a time by the figures below: their float64 and float32
temporaries stay within a few chunks (8 MB each in float64) however large the parameter (a
151,936 x 2,560 unembedding would otherwise take three 3 GB copies per inner product)."""


def chunks(t: Tensor) -> list[Tensor]:
    """`t` flattened, in pieces of at most CHUNK elements (views, no copy, for a contiguous `t`)."""
    return list(t.reshape(-1).split(CHUNK))


def grad_dot(a: Grads, b: Grads, where: Grads | None = None) -> float:
    """sum over parameters of <a_p, b_p>, over the parameters that `where` reaches (all if None);
    a None entry counts as zeros. In float64, a chunk of each parameter at a time."""
    total = None  # summed on the gradients' device: one host sync per call, not per parameter
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x is None or y is None or (where is not None and where[i] is None):
            continue
        for xs, ys in zip(chunks(x), chunks(y), strict=True):
            part = (xs.double() * ys.double()).sum()
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


# --------------------------------------------------------------------------- AdamW's view

AdamEntry = tuple[Tensor, float, float]
"""(v, c, eps) of one parameter: AdamW divides its gradient g by sqrt(v) / c + eps."""


def adam_state(optimizer, params: Sequence[Tensor]) -> list[AdamEntry | None] | None:
    """Per parameter, what AdamW divides the gradient by, read from `optimizer`'s state before this
    step's update (call it before `optimizer.step()`).

    v is `exp_avg_sq` (`max_exp_avg_sq` under amsgrad) after the previous t steps, c = sqrt(1 -
    beta2^t) its bias correction, eps the group's. That is the denominator of the last update; the
    coming update's adds this step's squared gradient with weight 1 - beta2 (0.001 by default).
    torch-optimi's Adam and AdamW keep v already debiased (c = 1). An entry is None for a
    parameter the optimizer keeps no state for. Returns None where the view does not apply: no
    optimizer, one that is not torch's or torch-optimi's Adam or AdamW, or no step taken yet.
    """
    family = _adam_family(optimizer)
    if family is None:
        return None
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    entries: list[AdamEntry | None] = []
    for p in params:
        state, group = optimizer.state.get(p, {}), group_of.get(id(p))
        key = "max_exp_avg_sq" if group is not None and group.get("amsgrad") else "exp_avg_sq"
        step = state.get("step")
        if step is None and family == "optimi" and group is not None:
            step = group.get("step")  # torch-optimi counts steps per group
        if key not in state or step is None or float(step) < 1:
            entries.append(None)
            continue
        c = 1.0 if family == "optimi" else math.sqrt(1.0 - group["betas"][1] ** float(step))
        entries.append((state[key], c, float(group["eps"])))
    return entries if any(e is not None for e in entries) else None


def _adam_family(optimizer) -> str | None:
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return "torch"
    cls = type(optimizer)
    if cls.__module__.split(".")[0] == "optimi" and cls.__name__ in ("Adam", "AdamW"):
        return "optimi"
    return None


def adam_view(grads: Mapping[str, Grads], state: Sequence[AdamEntry | None]) -> dict[str, float]:
    """Each alignment term's gradient as AdamW sees it: u = g / (sqrt(v) / c + eps) per coordinate
    (`adam_state`), against the policy gradient's u. Returns `grad/<term>/adam_norm_ratio` =
    |u_term| / |u_policy| and `grad/<term>/adam_cos_policy` = cos(u_term, u_policy).

    Adam's step is about lr · m / (sqrt(v) / c + eps) with m the momentum (exp_avg): every gradient
    enters it divided by the same denominator, so u_term / |u_policy| is the term's part of this
    step's new momentum entry relative to the policy gradient's (lr and the momentum's weight
    1 - beta1 cancel in both ratios). It is the preconditioned gradient, not the momentum-integrated
    step: m averages about 1 / (1 - beta1) = 10 steps, and a term adds up in it only if it keeps its
    direction from step to step (`cos_prev`). Decoupled weight decay is not a gradient and is left
    out. Empty without a policy gradient, or where a term has a gradient on a parameter without
    optimizer state. One chunk of one parameter is preconditioned at a time: no parameter-sized
    temporary is made. Under FSDP each rank takes the rows of its shard of v (no gather) and the
    sums are all-reduced: a collective, so every rank calls it.
    """
    if "policy" not in grads:
        return {}
    # sums over whole parameters, and over this rank's shards of FSDP-sharded ones (all-reduced below)
    sums: dict[bool, dict[str, Tensor | None]] = {False: {}, True: {}}
    mesh = None
    for i, entry in enumerate(state):
        here = {name: g[i] for name, g in grads.items() if g[i] is not None}
        if not here:
            continue
        if entry is None:
            return {}
        v, c, eps = entry
        sharded = hasattr(v, "to_local")
        if sharded:  # an FSDP shard: the same rows of each (gathered, identical) gradient, no gather of v
            # on use: only sharded runs reach here
            from torch.distributed.tensor import distribute_tensor

            mesh = v.device_mesh
            here = {name: distribute_tensor(g, mesh, v.placements, src_data_rank=None).to_local()
                    for name, g in here.items()}
            v = v.to_local()
        _adam_sums(sums[sharded], here, v, c, eps)
    if mesh is not None:  # every rank holds sharded state: each reduces the same keys in the same order
        for key in sorted(sums[True]):
            total = sums[True][key]
            torch.distributed.all_reduce(total, group=mesh.get_group())
    squares = {name: _sum(sums, ("sq", name)) for name in grads}
    dots = {name: _sum(sums, ("dot", name)) for name in grads if name != "policy"}
    policy = math.sqrt(_value(squares["policy"]))
    out = {}
    for name in dots:
        norm = math.sqrt(_value(squares[name]))
        out[f"grad/{name}/adam_norm_ratio"] = norm / policy if policy > 0 else 0.0
        out[f"grad/{name}/adam_cos_policy"] = _value(dots[name]) / (norm * policy) if norm * policy > 0 else 0.0
    return out


def _adam_sums(sums: dict, grads: Mapping[str, Tensor], v: Tensor, c: float, eps: float) -> None:
    """Add one parameter's sum of u^2 per term and u_term . u_policy to `sums`, u = g / (sqrt(v) /
    c + eps), a chunk at a time: no parameter-sized temporaries."""
    pieces = {name: chunks(g) for name, g in grads.items()}
    for j, vs in enumerate(chunks(v)):
        denom = vs.float().sqrt().div_(c).add_(eps)
        u = {name: gs[j].float() / denom for name, gs in pieces.items()}
        for name, x in u.items():
            sums[("sq", name)] = _add(sums.get(("sq", name)), (x * x).sum(dtype=torch.float64))
            if name != "policy" and "policy" in u:
                sums[("dot", name)] = _add(sums.get(("dot", name)), (x * u["policy"]).sum(dtype=torch.float64))


def _sum(sums: dict, key) -> Tensor | None:
    """The whole parameters' and the shards' sums of `key` together (None if neither has it)."""
    total = None
    for part in sums.values():
        if part.get(key) is not None:
            total = _add(total, part[key])
    return total


def _add(total: Tensor | None, part: Tensor) -> Tensor:
    """Sums kept on the gradients' device: one host sync per total, not per parameter."""
    return part if total is None else total + part.to(total.device)


def _value(total: Tensor | None) -> float:
    return 0.0 if total is None else float(total)


# --------------------------------------------------------------------------- across steps


class PreviousGradients:
    """Each term's gradient on the last gradient-view step, for `grad/<term>/cos_prev`: the cosine
    between a term's gradient now and on the previous gradient-view step (`log.every_n_steps`
    earlier, not the previous optimizer step).

    Memory stays bounded. Where the parameters have at most `dims` elements in all (or dims = 0),
    the gradient is kept exactly, as a float32 copy on the CPU. Otherwise it is kept as a
    CountSketch of `dims` coordinates: element j of parameter k adds s_j · g_j to coordinate h_j,
    with h_j uniform in [0, dims) and the sign s_j = ±1 drawn from a generator seeded by (seed, k,
    chunk), the same on every call. The sketched inner product is an unbiased estimate of the
    exact one, and the sketched cosine has a standard deviation of about sqrt((1 + cos^2) / dims)
    around the exact cosine (0.008-0.011 at dims = 16384). The module keeps the vectors in its
    checkpoints, so a resumed run logs the same `cos_prev` as an uninterrupted one (a checkpoint
    written before they were kept resumes without `cos_prev` on its first gradient-view step).
    """

    CHUNK = CHUNK
    """Elements hashed at a time: the hash's temporaries stay near 20 MB for any parameter."""

    def __init__(self, dims: int = 16384, seed: int = 0):
        self.dims, self.seed = dims, seed
        self.last: dict[str, Tensor] = {}

    def vector(self, grads: Grads, params: Sequence[Tensor]) -> Tensor:
        """The kept form of one term's gradient: [N] exact or [dims] sketched, float32 on the CPU."""
        total = sum(p.numel() for p in params)
        if self.dims <= 0 or total <= self.dims:
            return torch.cat([torch.zeros(p.numel()) if g is None else g.detach().float().flatten().cpu()
                              for g, p in zip(grads, params, strict=True)])
        out = None
        for k, g in enumerate(grads):
            if g is None:
                continue
            flat = g.detach().flatten()
            out = torch.zeros(self.dims, dtype=torch.float64, device=flat.device) if out is None else out
            for lo in range(0, flat.numel(), self.CHUNK):
                part = flat[lo : lo + self.CHUNK]
                gen = torch.Generator(device=flat.device)
                gen.manual_seed((self.seed << 40) + (k << 20) + lo // self.CHUNK)
                where = torch.randint(self.dims, part.shape, generator=gen, device=flat.device)
                sign = 1.0 - 2.0 * torch.randint(2, part.shape, generator=gen, device=flat.device)
                out.index_add_(0, where.to(out.device), part.double().mul_(sign).to(out.device))
        return torch.zeros(self.dims) if out is None else out.float().cpu()

    def update(self, grads: Mapping[str, Grads], params: Sequence[Tensor]) -> dict[str, float]:
        """`grad/<term>/cos_prev` for each term that also had a gradient on the previous
        gradient-view step; then keeps this step's terms (only them) for the next one."""
        out, kept = {}, {}
        for name, term in grads.items():
            kept[name] = now = self.vector(term, params)
            before = self.last.get(name)
            if before is not None and before.shape == now.shape:
                out[f"grad/{name}/cos_prev"] = flat_cosine(before, now)
        self.last = kept
        return out


def flat_cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two flat vectors, in float64; 0 when either is zero."""
    a, b = a.double(), b.double()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


# --------------------------------------------------------------------------- accumulation


class GradientView:
    """Per-term gradients of one optimisation step, summed over its micro-batches.

    `add(terms)` after each micro-batch's forward (before its backward): the weighted terms'
    gradients w.r.t. `params`; `finish(total)` with the accumulated `.grad` of `params` (before
    clipping); then `metrics(...)`, once, before the optimizer steps. derive_policy: take the
    policy term's gradient as the total minus the alignment terms' instead of from its own backward
    pass. optimizer: the AdamW view from its state (`adam_state`; None or another optimizer: no
    `adam_*` keys). previous: the gradients of the last gradient-view step (`PreviousGradients`,
    kept across steps by the caller; None: no `cos_prev`). state_params: where the optimizer keeps
    the state of each of `params` (FSDP: the shards of the gathered `params`; default `params`).
    """

    def __init__(self, params: Sequence[Tensor], weights: Mapping[str, float], derive_policy: bool = False,
                 optimizer=None, previous: PreviousGradients | None = None,
                 state_params: Sequence[Tensor] | None = None):
        self.params = list(params)
        self.state_params = self.params if state_params is None else list(state_params)
        """The optimizer's own parameters, one per entry of `params` (FSDP: the shards)."""
        self.weights = dict(weights)  # term -> its weight in the total (policy 1)
        self.derive_policy = derive_policy
        self.optimizer = optimizer
        self.previous = previous
        self.grads: dict[str, list[Tensor | None]] = {}
        self.seconds = 0.0

    def add(self, terms: Mapping[str, Tensor]) -> None:
        start = time.perf_counter()
        for name in view_terms():
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
        for name in view_terms():  # the same order on every rank
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
            out[f"grad/{name}/norm_ratio"] = out[f"grad/{name}/norm"] / whole if whole > 0 else 0.0
            out[f"grad/{name}/norm_ratio_reach"] = out[f"grad/{name}/norm"] / reach if reach > 0 else 0.0
            out[f"grad/{name}/cos_policy"] = grad_cosine(grads, policy)
        start = time.perf_counter()
        state = adam_state(self.optimizer, self.state_params) if self.optimizer is not None else None
        if state is not None:
            out.update(adam_view(self.grads, state))
        if self.previous is not None:
            out.update(self.previous.update(self.grads, self.params))
        self.seconds += time.perf_counter() - start
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

