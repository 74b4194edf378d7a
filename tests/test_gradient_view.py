"""The gradient view: its pure math by hand; the AdamW view against a hand computation from the
gradients AdamW was given; the cross-step cosine exact and sketched; and the per-term gradients
on a tiny model against a naive reference (one separate backward pass per term)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_alignment_in_view, assert_gradients_flowed, fit_rows
from test_alignment_options import _module, _rollout

from oisd_lab.config import compose
from oisd_lab.gradient_view import (
    GradientView,
    PreviousGradients,
    adam_state,
    adam_view,
    advantage_length_cov,
    divergence_means,
    flat_cosine,
    frac_zero_advantage_groups,
    grad_cosine,
    grad_dot,
    grad_norm,
    reach_fraction,
)
from oisd_lab.module import OISDModule
from oisd_lab.optim import build_optimizer
from oisd_lab.sampler import Sampler
from oisd_lab.sources import load_source


def test_gradient_math_by_hand():
    a = [torch.tensor([3.0, 0.0]), None, torch.tensor([[4.0]])]
    b = [torch.tensor([1.0, 2.0]), torch.tensor([5.0]), torch.tensor([[0.0]])]
    assert grad_norm(a) == 5.0 and grad_dot(a, b) == 3.0
    assert grad_cosine(a, b) == pytest.approx(3.0 / (5.0 * math.sqrt(30.0)))
    assert grad_norm(b, where=a) == pytest.approx(math.sqrt(5.0))  # b without the entry a cannot reach
    assert grad_cosine(a, [None, None, None]) == 0.0
    params = [torch.zeros(2), torch.zeros(1), torch.zeros(1, 1)]
    assert reach_fraction(a, params) == 0.75


def test_rollout_statistics_by_hand():
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.5, -0.5])
    lengths = torch.tensor([10.0, 4.0, 7.0, 7.0, 6.0, 8.0])
    # centred lengths [3, -3, 0, 0, -1, 1]; adv mean 0: (3 + 3 - 0.5 - 0.5) / 6
    assert advantage_length_cov(adv, lengths) == pytest.approx(5.0 / 6.0)
    assert advantage_length_cov(adv, lengths) == pytest.approx(float(torch.cov(torch.stack([adv, lengths]),
                                                                              correction=0)[0, 1]))
    assert frac_zero_advantage_groups(adv, 2) == pytest.approx(1 / 3)
    stats = {"stat/think/div_pos": torch.tensor(0.6), "stat/think/tokens_pos": torch.tensor(3.0),
             "stat/think/div_neg": torch.tensor(0.0), "stat/think/tokens_neg": torch.tensor(0.0)}
    assert divergence_means(stats) == {"grad/think/div_pos": pytest.approx(0.2)}  # empty split left out


# --------------------------------------------------------------------------- AdamW's view


def _flat(grads, params):
    return torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.double().flatten()
                      for g, p in zip(grads, params, strict=True)])


def _adam_by_hand(history, grads, params, betas=(0.9, 0.999), eps=1e-8):
    """u = g / (sqrt(v_hat) + eps) from the gradients AdamW was given, in float64: v_t = beta2 v_{t-1}
    + (1 - beta2) g_t^2 after len(history) steps, v_hat = v_t / (1 - beta2^t). -> {term: flat u}."""
    t = len(history)
    v = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for step_grads in history:
        v = [betas[1] * vi + (1 - betas[1]) * g.double() ** 2 for vi, g in zip(v, step_grads, strict=True)]
    denom = [(vi / (1 - betas[1] ** t)).sqrt() + eps for vi in v]
    return {name: _flat([None if x is None else x.double() / d for x, d in zip(g, denom, strict=True)], params)
            for name, g in grads.items()}


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _params_and_history(steps: int, opt_cls=torch.optim.AdamW, eps=1e-8, **kw):
    """Two parameters, `steps` real AdamW steps on gradients whose scale differs per coordinate (so
    the second moment reweights them), and the next step's policy and think gradients."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]
    scale = [torch.logspace(-3, 1, 12).reshape(3, 4), torch.logspace(1, -2, 5)]
    opt = opt_cls(params, lr=0.01, betas=(0.9, 0.999), eps=eps, weight_decay=0.1, **kw)
    history = []
    for _ in range(steps):
        history.append([torch.randn(p.shape, generator=gen) * s for p, s in zip(params, scale, strict=True)])
        for p, g in zip(params, history[-1], strict=True):
            p.grad = g.clone()
        opt.step()
    policy = [torch.randn(p.shape, generator=gen) * s for p, s in zip(params, scale, strict=True)]
    # think reaches the first parameter only: the policy gradient there plus noise of scale 1
    grads = {"policy": policy, "think": [policy[0] + torch.randn(3, 4, generator=gen), None]}
    return params, opt, history, grads


@pytest.mark.parametrize("eps", [1e-8, 1e-2])  # 1e-2: comparable to the small coordinates' sqrt(v_hat)
def test_adam_view_matches_a_hand_computation_from_adamw_state(eps):
    params, opt, history, grads = _params_and_history(2, eps=eps)
    u = _adam_by_hand(history, grads, params, eps=eps)
    # the state read is the one after the 2 steps taken, before this step's update
    v_state = opt.state[params[0]]["exp_avg_sq"].double()
    torch.testing.assert_close(v_state, 0.999 * 0.001 * history[0][0] ** 2 + 0.001 * history[1][0] ** 2,
                               check_dtype=False, rtol=1e-5, atol=0)
    got = adam_view(grads, adam_state(opt, params))
    ratio, cos = float(u["think"].norm() / u["policy"].norm()), _cos(u["think"], u["policy"])
    assert got["grad/think/adam_norm_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert got["grad/think/adam_cos_policy"] == pytest.approx(cos, rel=1e-5)
    assert got.keys() == {"grad/think/adam_norm_ratio", "grad/think/adam_cos_policy"}
    # the preconditioning matters here: the plain ratio and cosine are far from AdamW's
    plain = {name: _flat(g, params) for name, g in grads.items()}
    assert abs(float(plain["think"].norm() / plain["policy"].norm()) / ratio - 1) > 0.5
    assert abs(_cos(plain["think"], plain["policy"]) - cos) > 0.2


def test_divergence_means_per_advantage_sign_by_hand():
    stats = {"stat/think/div_pos": torch.tensor(3.0), "stat/think/tokens_pos": torch.tensor(1.0),
             "stat/think/div_neg": torch.tensor(6.0), "stat/think/tokens_neg": torch.tensor(4.0),
             "stat/think/div_zero": torch.tensor(0.0), "stat/think/tokens_zero": torch.tensor(0.0)}
    # one token is a mean; a sign without tokens has none
    assert divergence_means(stats) == {"grad/think/div_pos": 3.0, "grad/think/div_neg": 1.5}


def test_a_term_without_a_gradient_has_zero_figures_beside_the_others():
    """A term that reached no parameter (None everywhere) or gave zeros: ratio 0 and cosine 0
    (undefined, reported as 0), while the other term's figures are the hand computation's."""
    params, opt, history, grads = _params_and_history(2)
    grads = {**grads, "attn": [None, None], "zero": [torch.zeros(3, 4), None]}
    got = adam_view(grads, adam_state(opt, params))
    for name in ("attn", "zero"):
        assert got[f"grad/{name}/adam_norm_ratio"] == 0.0 and got[f"grad/{name}/adam_cos_policy"] == 0.0
    u = _adam_by_hand(history, {k: grads[k] for k in ("policy", "think")}, params)
    assert got["grad/think/adam_cos_policy"] == pytest.approx(_cos(u["think"], u["policy"]), rel=1e-5)


def test_figures_of_parameters_larger_than_a_chunk_equal_the_whole_tensor_formulas_in_bounded_memory(monkeypatch):
    """A real-vocabulary unembedding is far larger than a chunk: the inner products and the AdamW
    view, taken a chunk at a time, equal the one-pass float64 formulas, and their temporaries stay
    within a few chunks instead of three float64 copies of the parameter."""
    from oisd_lab import gradient_view as gv
    from oisd_lab.synthetic import profiler_peak

    monkeypatch.setattr(gv, "CHUNK", 1 << 14)
    gen = torch.Generator().manual_seed(0)
    shapes = [(1000, 64), (7,), (3, 5)]  # 64,000 elements: 3.9 chunks, and two below one chunk
    a = [torch.randn(s, generator=gen) for s in shapes]
    b = [torch.randn(s, generator=gen) for s in shapes]
    whole = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))
    assert grad_dot(a, b) == pytest.approx(whole, rel=1e-12)
    assert grad_dot(a, [b[0], None, b[2]]) == pytest.approx(whole - float((a[1].double() * b[1].double()).sum()),
                                                            rel=1e-12)
    v = [torch.rand(s, generator=gen) * 1e-4 for s in shapes]
    state = [(x, 0.5, 1e-8) for x in v]
    got = adam_view({"policy": a, "think": b}, state)
    u = {n: torch.cat([(g.double() / (x.double().sqrt() / 0.5 + 1e-8)).flatten() for g, x in zip(gs, v, strict=True)])
         for n, gs in {"policy": a, "think": b}.items()}
    assert got["grad/think/adam_norm_ratio"] == pytest.approx(float(u["think"].norm() / u["policy"].norm()), rel=1e-5)
    assert got["grad/think/adam_cos_policy"] == pytest.approx(_cos(u["think"], u["policy"]), rel=1e-4, abs=1e-6)
    # memory: one parameter of 64,000 floats is 256 KB; the old one-pass dot made 3 x 512 KB
    chunk_f64 = 8 * gv.CHUNK
    assert profiler_peak(lambda: grad_dot(a, b)) <= 4 * chunk_f64
    assert profiler_peak(lambda: adam_view({"policy": a, "think": b}, state)) <= 8 * 4 * gv.CHUNK  # whole: 1.5 MB


def test_derived_policy_gradient_and_the_figures_of_each_term_by_hand():
    """derive_policy: policy = total - think - attn per parameter; a parameter no term reached
    (BuPO: the layers above its internal policy) stays None. The figures by hand, and only the
    documented keys: the policy term gets its norm and reach, each other term its figures
    against the policy."""
    params = [torch.zeros(2), torch.zeros(3), torch.zeros(1)]
    view = GradientView(params, {"policy": 1.0, "think": 1.0, "attn": 1.0}, derive_policy=True)
    view.grads = {"think": [torch.tensor([1.0, 0.0]), None, None],
                  "attn": [None, torch.tensor([0.0, 2.0, 0.0]), None]}
    view.finish([torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0, 2.0]), None])
    policy = view.grads["policy"]
    assert policy[0].tolist() == [2.0, 4.0] and policy[1].tolist() == [1.0, 0.0, 2.0] and policy[2] is None
    got = view.metrics({}, torch.tensor([1.0, -1.0, 0.0, 0.0]), torch.tensor([3.0, 1.0, 2.0, 2.0]), 2)
    # |policy| = sqrt(4 + 16 + 1 + 4) = 5; <think, policy> = 2; <attn, policy> = 0
    assert got == {
        "grad/policy/norm": pytest.approx(5.0), "grad/policy/reach": pytest.approx(5 / 6),
        "grad/think/norm": pytest.approx(1.0), "grad/think/reach": pytest.approx(2 / 6),
        "grad/think/norm_ratio": pytest.approx(0.2), "grad/think/norm_ratio_reach": pytest.approx(1 / 20 ** 0.5),
        "grad/think/cos_policy": pytest.approx(0.4),
        "grad/attn/norm": pytest.approx(2.0), "grad/attn/reach": pytest.approx(3 / 6),
        "grad/attn/norm_ratio": pytest.approx(0.4), "grad/attn/norm_ratio_reach": pytest.approx(2 / 5 ** 0.5),
        "grad/attn/cos_policy": 0.0,
        # population covariance of A (1, -1, 0, 0) and lengths (3, 1, 2, 2): (1 + 1 + 0 + 0) / 4
        "grad/cov_adv_length": pytest.approx(0.5), "grad/frac_zero_adv_groups": 0.5,
        "time/gradient_view": got["time/gradient_view"],
    }


def test_a_logging_step_logs_the_documented_gradient_view_keys(tmp_path):
    """One OISD step with the view from the shipped warm start (rewards that differ within
    groups): each channel's figures against the policy and its mean divergence per advantage sign
    under `grad/<channel>/div_<sign>`; the step's raw per-sign sums (`stat/...`) are not logged."""
    from oisd_lab import pretrain
    from oisd_lab.models import load_pretrained

    cfg = compose([f"pretrain.cache_dir={tmp_path}", "method=oisd", "log.gradient_view=true", "max_steps=1",
                   "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.max_completion_length=16"])
    model, tok = load_pretrained(pretrain.warm_start(cfg, log=lambda line: None))
    source = load_source(cfg.task)
    torch.manual_seed(0)
    rows = fit_rows(OISDModule(cfg, model, tok, Sampler(cfg, model, tok, source, source.reward)), 1)
    assert_gradients_flowed(rows)
    assert_alignment_in_view(rows)
    (row,) = rows
    assert not [k for k in row if k.startswith("stat/")]
    assert {k for k in row if k.startswith("grad/policy/")} == {"grad/policy/norm", "grad/policy/reach"}
    for channel in ("think", "attn"):
        figures = {k.rsplit("/", 1)[1] for k in row if k.startswith(f"grad/{channel}/")}
        assert {"norm", "reach", "norm_ratio", "norm_ratio_reach", "cos_policy"} <= figures
        signs = {f[4:] for f in figures if f.startswith("div_")}
        assert {"pos", "neg"} <= signs <= {"pos", "neg", "zero"}
        assert all(row[f"grad/{channel}/div_{sign}"] > 0 for sign in signs)


def test_adam_view_of_torch_optimi_and_amsgrad():
    optimi = pytest.importorskip("optimi")
    _, _, _, grads = _params_and_history(3)
    params, opt, history, _ = _params_and_history(3, optimi.AdamW, foreach=False)
    u = _adam_by_hand(history, grads, params)  # optimi keeps v debiased: the same u
    got = adam_view(grads, adam_state(opt, params))
    assert got["grad/think/adam_norm_ratio"] == pytest.approx(float(u["think"].norm() / u["policy"].norm()), rel=1e-5)
    assert got["grad/think/adam_cos_policy"] == pytest.approx(_cos(u["think"], u["policy"]), rel=1e-5)
    params, opt, history, _ = _params_and_history(2, amsgrad=True)
    state = adam_state(opt, params)
    assert state[0][0] is opt.state[params[0]]["max_exp_avg_sq"] and state[0][1] == pytest.approx((1 - 0.999**2) ** 0.5)


def test_no_adam_view_without_state_or_adam():
    params, opt, _, grads = _params_and_history(0)
    assert adam_state(opt, params) is None  # no step yet
    assert adam_state(torch.optim.SGD(params, lr=0.1), params) is None
    view = GradientView(params, {"policy": 1.0, "think": 1.0}, optimizer=torch.optim.SGD(params, lr=0.1))
    view.grads = grads
    got = view.metrics({}, torch.zeros(4), torch.ones(4), 2)
    assert "grad/think/norm_ratio" in got and not any("adam" in k for k in got)
    extra = torch.nn.Parameter(torch.zeros(2))  # a gradient where the optimizer keeps no state
    params, opt, _, grads = _params_and_history(1)
    grads = {name: [*g, torch.ones(2)] for name, g in grads.items()}
    assert adam_view(grads, adam_state(opt, [*params, extra])) == {}


# --------------------------------------------------------------------------- across steps


def test_cos_prev_is_the_cosine_with_the_previous_view_step():
    params = [torch.zeros(2), torch.zeros(3)]
    prev = PreviousGradients(dims=0)
    first = {"policy": [torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0, -1.0])], "think": [None, torch.ones(3)]}
    second = {"policy": [torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])], "think": [torch.ones(2), None]}
    assert prev.update(first, params) == {}
    got = prev.update(second, params)
    # policy: <(1,2,0,1,-1), (2,0,1,1,1)> = 2 + 0 + 0 + 1 - 1 = 2, norms sqrt(7) and sqrt(7)
    assert got["grad/policy/cos_prev"] == pytest.approx(2 / 7)
    assert got["grad/think/cos_prev"] == 0.0  # disjoint reach
    assert prev.update({"policy": second["policy"]}, params) == {"grad/policy/cos_prev": pytest.approx(1.0)}
    assert "grad/think/cos_prev" not in prev.update(second, params)  # think skipped the last view step


@pytest.mark.parametrize("cos", [-0.9, -0.3, 0.0, 0.5, 0.95])
def test_sketched_cos_prev_approximates_the_exact_cosine(cos):
    """The CountSketch's cosine error has std about sqrt((1 + cos^2) / dims) = 0.016-0.022 at dims
    4096; the tolerance 0.07 is more than 3 of them."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(300, 400), (30_000,), (7, 1000)]
    a = [torch.randn(s, generator=gen) for s in shapes]
    noise = [torch.randn(s, generator=gen) for s in shapes]
    b = [cos * x + (1 - cos**2) ** 0.5 * n for x, n in zip(a, noise, strict=True)]
    params = [torch.zeros(s) for s in shapes]
    exact = flat_cosine(_flat(a, params), _flat(b, params))
    assert exact == pytest.approx(cos, abs=0.01)
    sketch = PreviousGradients(dims=4096, seed=3)
    sketch.CHUNK = 50_000  # several chunks per large parameter
    assert sketch.vector(a, params).shape == (4096,)
    sketch.update({"think": a}, params)
    assert sketch.update({"think": b}, params)["grad/think/cos_prev"] == pytest.approx(exact, abs=0.07)
    assert sketch.update({"think": b}, params)["grad/think/cos_prev"] == pytest.approx(1.0, abs=1e-6)
    # the sketch is linear and the same on every call: S(a + b) = S a + S b
    torch.testing.assert_close(sketch.vector([x + y for x, y in zip(a, b, strict=True)], params),
                               sketch.vector(a, params) + sketch.vector(b, params), rtol=1e-4, atol=1e-3)


def _naive(module, rollout, adv, micro):
    """Each term's weighted gradient from its own backward passes over the same micro-batches."""
    module.cfg.grpo.micro_batch_size = micro
    norm = module.normalisers(rollout)
    weights = {"policy": 1.0, "think": module.objective.logit_weight, "attn": module.objective.attn_weight}
    params = list(module.policy.parameters())
    grads = {}
    for name, weight in weights.items():
        module.policy.zero_grad(set_to_none=True)
        for part in module.micro_batches(rollout.scored(adv)):
            (weight * module.loss_terms(part, norm)[f"loss/{name}"]).backward()
        grads[name] = [None if p.grad is None else p.grad.clone() for p in params]
    return grads


@pytest.mark.parametrize("lens_grad, derive_policy", [("full", True), ("hidden_only", True), ("full", False)])
def test_gradient_view_matches_separate_backward_passes(tiny_model, char_tokenizer, lens_grad, derive_policy):
    module = _module(tiny_model, char_tokenizer, "method=oisd", "method.attn_weight=10",
                     f"method.lens_grad={lens_grad}")
    rollout = _rollout([6, 3, 8, 5, 2, 7, 8, 4] * 2, [0, 1, 2, 0] * 4)
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.9, 0.9, -0.9, -0.9, 1.2, -1.2, 0.3, -0.3])
    ref = _naive(module, rollout, adv, micro=4)
    module.policy.zero_grad(set_to_none=True)
    view = module.gradient_view()
    assert view.derive_policy  # one process, no loss scaler: the policy gradient is .grad minus the rest
    view.derive_policy = derive_policy  # False: its own backward pass (DDP, GradScaler)
    sums = module.accumulate(rollout.scored(adv), backward=torch.Tensor.backward, view=view)
    got = module.gradient_view_metrics(view, {k: v for k, v in sums.items() if k.startswith("stat/")},
                                       rollout.scored(adv))
    for name in ("policy", "think", "attn"):
        assert got[f"grad/{name}/norm"] == pytest.approx(grad_norm(ref[name]), rel=1e-5)
        assert got[f"grad/{name}/reach"] == reach_fraction(ref[name], list(module.policy.parameters()))
    for name in ("think", "attn"):
        cos = grad_cosine(ref[name], ref["policy"])
        assert got[f"grad/{name}/cos_policy"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
        ratio = grad_norm(ref[name]) / grad_norm(ref["policy"])
        assert got[f"grad/{name}/norm_ratio"] == pytest.approx(ratio, rel=1e-5)
        ratio_reach = grad_norm(ref[name]) / grad_norm(ref["policy"], where=ref[name])
        assert got[f"grad/{name}/norm_ratio_reach"] == pytest.approx(ratio_reach, rel=1e-5)
        assert f"grad/{name}/share" not in got and f"grad/{name}/adam_norm_ratio" not in got  # no optimizer
    # the detached teacher keeps the layers above the student out of reach; hidden_only also the readout
    readout = module.policy.model.norm.weight
    index = [i for i, p in enumerate(module.policy.parameters()) if p is readout][0]
    assert got["grad/think/reach"] < 1.0 and (ref["think"][index] is None) == (lens_grad == "hidden_only")
    assert got["grad/frac_zero_adv_groups"] == 0.25 and got["time/gradient_view"] > 0
    assert {"grad/think/div_pos", "grad/think/div_neg", "grad/attn/div_zero"} <= got.keys()
    # the view leaves the update alone: .grad is the sum of the three terms' gradients
    for i, (name, p) in enumerate(module.policy.named_parameters()):
        parts = [ref[t][i] for t in ("policy", "think", "attn") if ref[t][i] is not None]
        torch.testing.assert_close(p.grad, sum(parts), rtol=1e-4, atol=1e-7, msg=name)


def test_gradient_view_over_two_real_adamw_steps(tiny_model, char_tokenizer):
    """The module's view on two consecutive steps with the recipe's AdamW: no AdamW view and no
    cos_prev on the first; on the second, both equal hand computations from the naive per-term
    gradients and the total gradient AdamW was given on the first."""
    module = _module(tiny_model, char_tokenizer, "method=oisd", "method.attn_weight=10",
                     "log.gradient_view_sketch=0")
    params = list(module.policy.parameters())
    opt = build_optimizer(params, module.cfg.grpo)
    rollout = _rollout([6, 3, 8, 5, 2, 7, 8, 4] * 2, [0, 1, 2, 0] * 4)
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.9, 0.9, -0.9, -0.9, 1.2, -1.2, 0.3, -0.3])
    refs, totals, got, sketched = [], [], [], []
    sketch = PreviousGradients(dims=16384)  # the default sketch, beside the module's exact copy
    for step_adv in (adv, adv.flip(0)):  # the second step credits other rollouts
        refs.append(_naive(module, rollout, step_adv, micro=4))
        module.policy.zero_grad(set_to_none=True)
        view = module.gradient_view(opt)
        sums = module.accumulate(rollout.scored(step_adv), backward=torch.Tensor.backward, view=view)
        got.append(module.gradient_view_metrics(view, {k: v for k, v in sums.items() if k.startswith("stat/")},
                                                rollout.scored(step_adv)))
        totals.append([p.grad.clone() for p in params])  # what AdamW is given (no clipping here)
        sketched.append(sketch.update(view.grads, params))
        opt.step()
    assert not any("adam" in k or "cos_prev" in k for k in got[0])
    betas, eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    u = _adam_by_hand(totals[:1], refs[1], params, betas=betas, eps=eps)
    for name in ("think", "attn"):
        ratio = float(u[name].norm() / u["policy"].norm())
        assert got[1][f"grad/{name}/adam_norm_ratio"] == pytest.approx(ratio, rel=1e-4)
        assert got[1][f"grad/{name}/adam_cos_policy"] == pytest.approx(_cos(u[name], u["policy"]), rel=1e-4, abs=1e-6)
    for name in ("policy", "think", "attn"):
        cos = _cos(_flat(refs[0][name], params), _flat(refs[1][name], params))
        assert got[1][f"grad/{name}/cos_prev"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
        # sketched: error std about sqrt((1 + cos^2) / 16384) < 0.011; 0.05 is more than 4 of them
        assert sketched[1][f"grad/{name}/cos_prev"] == pytest.approx(cos, abs=0.05)
