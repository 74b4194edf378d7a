"""Sampled per-layer diagnostics (`log.diag_rollouts`): the sample is uniform, a sampled pass
computes exactly the full pass's metrics on its rollouts, the standard error is the ratio
estimator's, and over repeated draws the sampled metrics agree with the full pass within their
standard errors (near-nominal coverage, no visible bias). `log.layer_diagnostics=false` skips the
pass."""

from __future__ import annotations

import math
import random

import pytest
import torch

from oisd_lab import diagnostics
from oisd_lab.config import compose
from oisd_lab.lens import find_readout
from oisd_lab.rollout import generate
from oisd_lab.run_hooks import LogStepHook, PolicyView


def test_combined_rows_are_token_means_with_the_ratio_estimators_error_by_hand():
    """Two micro-batches of per-rollout sums, 3 of 6 rollouts diagnosed: token means, the number
    of diagnosed rollouts, and se = sqrt((1 - m/M) * sum (y - r n)^2 / (m (m - 1) nbar^2)), with
    m/M the all split's share for every split (the positive split has 2 of the 3 rollouts)."""
    first = [{"layer": 2, "split": "all", "tokens": 5, "jsd": 3.0, "rollouts": {"tokens": [2, 3], "jsd": [1.0, 2.0]}},
             {"layer": 2, "split": "pos", "tokens": 2, "jsd": 1.0, "rollouts": {"tokens": [2], "jsd": [1.0]}}]
    second = [{"layer": 2, "split": "all", "tokens": 4, "jsd": 6.0, "rollouts": {"tokens": [4], "jsd": [6.0]}},
              {"layer": 2, "split": "pos", "tokens": 4, "jsd": 6.0, "rollouts": {"tokens": [4], "jsd": [6.0]}}]

    def se(ys, ns, fraction):
        m, r = len(ys), sum(ys) / sum(ns)
        spread = sum((y - r * n) ** 2 for y, n in zip(ys, ns, strict=True))
        return math.sqrt((1 - fraction) * spread / (m * (m - 1) * (sum(ns) / m) ** 2))

    rows = diagnostics.combine([first, second], population=6)
    assert rows == [
        {"layer": 2, "split": "all", "tokens": 9, "jsd": pytest.approx(1.0), "rollouts": 3,
         "se_jsd": pytest.approx(se([1.0, 2.0, 6.0], [2, 3, 4], 0.5), rel=1e-12)},
        {"layer": 2, "split": "pos", "tokens": 6, "jsd": pytest.approx(7 / 6), "rollouts": 2,
         "se_jsd": pytest.approx(se([1.0, 6.0], [2, 4], 0.5), rel=1e-12)},
    ]
    # every rollout diagnosed: means only
    assert diagnostics.combine([first, second]) == [
        {"layer": 2, "split": "all", "tokens": 9, "jsd": pytest.approx(1.0)},
        {"layer": 2, "split": "pos", "tokens": 6, "jsd": pytest.approx(7 / 6)}]


def test_scalars_are_the_rows_with_tokens_of_the_chosen_layers_and_splits():
    rows = [{"layer": 1, "split": "all", "tokens": 1, "jsd": 0.5, "se_jsd": 0.1},
            {"layer": 1, "split": "neg", "tokens": 0, "jsd": None},  # an empty split has no value
            {"layer": 3, "split": "all", "tokens": 4, "jsd": 0.25},
            {"layer": 1, "split": "correct", "tokens": 2, "jsd": 0.75}]
    assert diagnostics.scalar_metrics(rows, [1]) == {"diag/jsd/all/L01": 0.5, "diag_se/jsd/all/L01": 0.1}


def test_default_diagnosed_layers_are_evenly_spaced_with_the_last():
    assert diagnostics.default_diag_layers(12) == list(range(1, 13))
    for depth in (13, 36, 64):
        layers = diagnostics.default_diag_layers(depth)
        # 11 evenly spaced from 0 (clamped to 1) plus the last; at 13 layers the first two round to 1
        assert len(layers) == (11 if depth == 13 else 12) and layers[0] == 1 and layers[-1] == depth, layers
        gaps = [b - a for a, b in zip(layers[:-1], layers[1:], strict=True)]
        assert max(gaps) - min(gaps) <= depth / 11 + 1, layers


def test_sample_is_uniform_without_replacement_and_seeded():
    assert diagnostics.sample_rollouts(10, 0, seed=1) == list(range(10))
    assert diagnostics.sample_rollouts(10, 12, seed=1) == list(range(10))
    a = diagnostics.sample_rollouts(20, 5, seed=7)
    assert a == diagnostics.sample_rollouts(20, 5, seed=7) and len(set(a)) == 5 and a == sorted(a)
    counts = [0] * 20
    draws = 4000
    for seed in range(draws):
        for i in diagnostics.sample_rollouts(20, 5, seed):
            counts[i] += 1
    expected = draws * 5 / 20  # 1000; sd of a count ~ sqrt(1000 * 0.75) ~ 27
    assert max(abs(c - expected) for c in counts) < 5 * 27.4


def test_ratio_se_by_hand():
    sums, tokens = [2.0, 6.0, 1.0], [4.0, 8.0, 2.0]
    r = 9.0 / 14.0
    nbar = 14.0 / 3
    spread = sum((y - r * n) ** 2 for y, n in zip(sums, tokens, strict=True))
    want = math.sqrt((1 - 0.25) * spread / (3 * 2 * nbar**2))
    assert diagnostics.ratio_se(sums, tokens, 0.25) == pytest.approx(want, rel=1e-12)
    assert diagnostics.ratio_se(sums, tokens, 1.0) == 0.0  # the whole population: no sampling error
    assert diagnostics.ratio_se([1.0, 5.0], [3.0, 0.0]) is None  # one rollout with tokens


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The shipped warm start on 8 held-out `arith` prompts x 4 samples: metrics that vary."""
    from oisd_lab import pretrain
    from oisd_lab.models import load_pretrained
    from oisd_lab.sources import load_source

    cfg = compose([f"pretrain.cache_dir={tmp_path_factory.mktemp('cache')}"])
    model, tok = load_pretrained(pretrain.warm_start(cfg, log=lambda line: None))
    model.eval()
    source = load_source(cfg.task)
    prompts = [source.format_prompt(p.prompt) for p in source.test_problems(8)]
    torch.manual_seed(5)
    rollout = generate(model, tok, prompts, 4, max_new_tokens=16, temperature=1.0)
    adv = torch.linspace(-1.0, 1.0, len(rollout))
    rewards = (adv > 0.3).float()
    return model, tok, rollout, adv, rewards


def _hook(tmp_path, *overrides):
    from oisd_lab.run.folder import RunDir

    cfg = compose(["grpo.micro_batch_size=8", *overrides])
    return LogStepHook(cfg, RunDir(tmp_path))


def _view(model, tok):
    return PolicyView(model, find_readout(model), tok, [2], torch.device("cpu"), True, [])


def test_sampled_pass_equals_the_full_pass_on_its_rollouts(setting, tmp_path):
    model, tok, rollout, adv, rewards = setting
    hook = _hook(tmp_path, "log.diag_rollouts=6")
    picked = diagnostics.sample_rollouts(len(rollout), 6, seed=hook.cfg.seed * 1_000_003 + 3)
    sampled = {(r["layer"], r["split"]): r for r in hook.diagnose(_view(model, tok), rollout.scored(adv, rewards), step=3)}
    readout = find_readout(model)
    layers = list(range(readout.num_layers + 1))
    whole = diagnostics.layer_metrics(model, readout, rollout, adv, rewards, layers, per_rollout=True)
    for row in whole:
        got = sampled[(row["layer"], row["split"])]
        keep = [i for i in picked if (row["split"] == "all" or _in_split(row["split"], adv[i], rewards[i]))]
        index = {i: j for j, i in enumerate(i for i in range(len(rollout))
                                            if row["split"] == "all" or _in_split(row["split"], adv[i], rewards[i]))}
        n = sum(row["rollouts"]["tokens"][index[i]] for i in keep)
        assert got["tokens"] == n and got["rollouts"] == len(keep)
        for name in ("lens_acc", "kl", "jsd", "entropy", "attn_jsd"):
            if n and name in row:
                want = sum(row["rollouts"][name][index[i]] for i in keep) / n
                assert got[name] == pytest.approx(want, rel=1e-5, abs=1e-7), (row["layer"], row["split"], name)
                se = diagnostics.ratio_se([row["rollouts"][name][index[i]] for i in keep],
                                          [row["rollouts"]["tokens"][index[i]] for i in keep], 6 / len(rollout))
                assert got[f"se_{name}"] == pytest.approx(se, rel=1e-9) if se is not None else got[f"se_{name}"] is None


def _in_split(split, a, r):
    return {"pos": a > 0, "neg": a < 0, "correct": r > 0.5, "wrong": r <= 0.5}[split]


@pytest.mark.parametrize("m, lowest", [(4, 0.78), (8, 0.85)])
def test_sampled_metrics_agree_with_the_full_pass_within_their_standard_errors(setting, m, lowest):
    """2,000 draws of m of the 32 rollouts: the mean estimate sits on the full-pass value (bias
    below a tenth of a standard error) and +-2 se covers it in `lowest`-99% of draws, for each
    metric of several layers (a ratio estimator on m clusters: +-2 se is nearer a t interval with
    m - 1 degrees of freedom, 86% at m = 4, than the normal 95%)."""
    model, tok, rollout, adv, rewards = setting
    readout = find_readout(model)
    whole = diagnostics.layer_metrics(model, readout, rollout, adv, rewards, [1, 3, readout.num_layers - 1],
                                      per_rollout=True)
    rng = random.Random(0)
    checked = 0
    for row in (r for r in whole if r["split"] == "all"):
        tokens = row["rollouts"]["tokens"]
        for name in ("lens_acc", "kl", "jsd", "entropy", "attn_jsd", "attn_cos"):
            full = row[name] / row["tokens"]
            values = row["rollouts"][name]
            hits, errors, ses = 0, [], []
            for _ in range(2000):
                pick = rng.sample(range(32), m)
                est = sum(values[i] for i in pick) / sum(tokens[i] for i in pick)
                se = diagnostics.ratio_se([values[i] for i in pick], [tokens[i] for i in pick], m / 32)
                hits += abs(est - full) <= 2 * se
                errors.append(est - full)
                ses.append(se)
            mean_se = sum(ses) / len(ses)
            assert mean_se > 0
            assert abs(sum(errors) / len(errors)) < 0.1 * mean_se, (row["layer"], name)
            assert lowest <= hits / 2000 <= 0.99, (row["layer"], name, hits / 2000)
            checked += 1
    assert checked == 18


def test_sampled_step_logs_standard_errors_and_the_switch_turns_the_pass_off(setting, tmp_path):
    model, tok, rollout, adv, rewards = setting
    problems = [type("P", (), {"prompt": "p", "answer": "a"})()] * 8
    hook = _hook(tmp_path / "on", "log.diag_rollouts=6", "log.snapshot_rollouts=0")
    (tmp_path / "on").mkdir()
    scalars = hook(_view(model, tok), 1, problems, rollout.scored(adv, rewards))
    layers = [k for k in diagnostics.default_diag_layers(find_readout(model).num_layers)]
    for k in layers:
        value, se = scalars[f"diag/kl/all/L{k:02d}"], scalars.get(f"diag_se/kl/all/L{k:02d}")
        assert se is not None and se >= 0 and math.isfinite(value)
    assert hook.run.diagnostics.exists()
    off = _hook(tmp_path / "off", "log.layer_diagnostics=false")
    (tmp_path / "off").mkdir()
    assert off(_view(model, tok), 1, problems, rollout.scored(adv, rewards)) == {}
    assert not off.run.diagnostics.exists() and off.run.completions.exists()
