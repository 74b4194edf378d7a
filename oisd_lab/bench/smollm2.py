"""`smollm2` section: a real pretrained model (SmolLM2-135M: 30 layers, 49,152-token vocabulary,
grouped-query attention) on the `word` task with its chat template.

Per round, side by side in one process: decoding the rollout (our loop and `model.generate`),
every preset's optimisation step on one fixed rollout of full-length completions (the module's
`time/forward_backward` timer: every micro-batch's forward and backward, clipping and AdamW), and
the same GRPO work through our Lightning loop and TRL's `GRPOTrainer` (as the `trl` section).
Once: a logging step's per-layer diagnostics (the layers the logging hook picks), and the peak memory of
one loss forward and backward at 256-token completions.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ..synthetic import profiler_peak
from .common import (
    NoEos,
    Settings,
    bench_config,
    bench_module,
    clock_now,
    fit_steps,
    median_of,
    per_round,
    rotated,
    stats,
)
from .versus_trl import ours_fit, trl_fit

OVERRIDES = {"task": "word", "model.chat_template": "true"}


def smol_settings(s: Settings) -> Settings:
    """The shared settings with this section's batch: prompts x generations x tokens, one micro-batch."""
    batch = s.smol_prompts * s.smol_generations
    return replace(s, prompts=s.smol_prompts, generations=s.smol_generations, max_len=s.smol_len, micro=batch,
                   trl_steps=s.smol_trl_steps, repeats=s.smol_rounds)


def bench_smollm2(s: Settings) -> dict:
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..models import load_pretrained
    from ..sources import load_source

    sm = smol_settings(s)
    policy, tok = load_pretrained(s.smol_model)
    cfgs = {m: bench_config(sm, m, **OVERRIDES) for m in s.presets}
    source = load_source(cfgs["grpo"].task)
    fmt = lambda text: source.format_prompt(text, tok, chat=True)  # noqa: E731
    problems = source.train_batch(0, sm.prompts, sm.seed)
    prompts = [fmt(p.prompt) for p in problems]
    out = {"model": s.smol_model, "num_layers": policy.config.num_hidden_layers,
           "vocab_size": policy.config.vocab_size, "parameters": sum(p.numel() for p in policy.parameters()),
           "batch": {"prompts": sm.prompts, "generations": sm.generations, "max_completion_length": sm.max_len,
                     "micro_batch_size": sm.micro, "task": "word", "chat_template": True}}
    init = copy.deepcopy(policy.state_dict())
    torch.manual_seed(sm.seed)
    fixed = (problems, _decode_ours(policy, NoEos(tok), prompts, sm))
    out["floor"] = floor_arithmetic(policy.config, fixed[1].prompt_length, sm.max_len, sm.generations)
    out["presets"] = _presets(sm, cfgs, policy, tok, source, fixed, prompts, init, fmt)
    policy.load_state_dict(init)
    out["diagnostics"] = _diagnostics(sm, cfgs["grpo"], policy, tok, source, fmt)
    policy.load_state_dict(init)
    out["trl"] = _versus_trl(sm, cfgs["grpo"], policy, tok, source, fmt)
    out["memory"] = _memory(s, policy, tok, source, fmt)
    return out


def floor_arithmetic(config, prompt_len: int, completion_len: int, generations: int = 1) -> dict:
    """Multiply-adds per token of the decoder layers and of the LM head, and the forward/backward
    ratio that one extra unembedding (the lens, forward and backward) sets as the floor: per
    token, for this batch's whole rows, and with the prompt's positions run once per group of
    `generations` rows (`grpo.shared_prompt`)."""
    d, ff, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    layer = 2 * d * d + 2 * d * kv + 3 * d * ff  # q, o; k, v; gate, up, down
    head = d * V
    per_token = L * layer + head
    # per sequence: every position runs the layers, only the C completion-predicting ones the head
    def floor(prompt_positions: float) -> float:
        seq = (prompt_positions + completion_len) * L * layer + completion_len * head
        return (seq + completion_len * head) / seq

    return {"layer_macs": layer, "head_macs": head, "per_token_macs": per_token,
            "floor_per_token": (per_token + head) / per_token,
            "prompt_len": prompt_len, "completion_len": completion_len,
            "floor_this_batch": floor(prompt_len), "floor_this_batch_shared_prompt": floor(prompt_len / generations)}


def _decode_ours(policy, tok, prompts, sm):
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..rollout import generate

    return generate(policy, tok, prompts, sm.generations, sm.max_len)


def _decode_hf(policy, tok, prompts, sm):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return policy.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           max_new_tokens=sm.max_len, min_new_tokens=sm.max_len,
                           num_return_sequences=sm.generations, pad_token_id=tok.pad_token_id)


def _timed_call(fn, *args) -> dict:
    w0, c0 = clock_now()
    fn(*args)
    w1, c1 = clock_now()
    return {"wall": w1 - w0, "cpu": c1 - c0}


def _presets(sm, cfgs, policy, tok, source, fixed, prompts, init, fmt) -> dict:
    """Per round: decoding (ours, `model.generate`; full length) and each preset's optimisation step."""
    fits: dict[str, list[list[dict]]] = {m: [] for m in cfgs}
    decode: dict[str, list[dict]] = {"ours": [], "hf": []}
    fit_steps(bench_module(cfgs["grpo"], policy, tok, source, fixed, format_prompt=fmt), 1)  # process warm-up
    for r in range(sm.repeats):
        for name in rotated(("ours", "hf"), r):
            torch.manual_seed(sm.seed + r)
            fn = _decode_ours if name == "ours" else _decode_hf
            decode[name].append(_timed_call(fn, policy, NoEos(tok) if name == "ours" else tok, prompts, sm))
        for m in rotated(tuple(cfgs), r):
            policy.load_state_dict(init)
            fits[m].append(fit_steps(bench_module(cfgs[m], policy, tok, source, fixed, format_prompt=fmt), 1))
    out: dict = {"decode_s": {n: {c: stats([x[c] for x in v]) for c in ("cpu", "wall")} for n, v in decode.items()},
                 "decode_ours_vs_hf": {c: stats([a[c] / b[c] for a, b in zip(decode["ours"], decode["hf"],
                                                                              strict=True)]) for c in ("cpu", "wall")},
                 "per_preset": {}}
    for m in cfgs:
        out["per_preset"][m] = {}
        for c in ("cpu", "wall"):
            gen = out["decode_s"]["ours"][c]["median"]
            key = f"optimise_{c}"
            out["per_preset"][m][c] = {
                "forward_backward_s": stats([median_of(x, key) for x in fits[m]]),
                "ratio_fb_vs_grpo": per_round(fits[m], fits["grpo"],
                                               lambda a, b, k=key: median_of(a, k) / median_of(b, k)),
                "ratio_full_vs_grpo": per_round(fits[m], fits["grpo"], lambda a, b, k=key, g=gen:
                                                 (g + median_of(a, k)) / (g + median_of(b, k))),
            }
    return out


def _diagnostics(sm, cfg, policy, tok, source, fmt) -> dict:
    """One `grpo` fit of two full steps with the run's logging hook: step 1 is a logging step."""
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..run.folder import RunDir
    from ..run_hooks import LogStepHook

    with tempfile.TemporaryDirectory(prefix="oisd_bench_smol_") as tmp:
        hook = LogStepHook(cfg, RunDir(Path(tmp)))
        rows = fit_steps(bench_module(cfg, policy, tok, source, hook=hook, format_prompt=fmt), 2)
    every = cfg.log.every_n_steps
    module = bench_module(cfg, policy, tok, source)
    out = {"log_every_n_steps": every, "layers_diagnosed": _diagnosed(cfg, module)}
    for c in ("cpu", "wall"):
        diag, step = rows[0][f"diagnostics_{c}"], rows[1][c]
        out[c] = {"diagnostics_per_log_step_s": diag, "full_step_s": step, "rollout_s": rows[1][f"rollout_{c}"],
                  "amortised_share_of_step": diag / every / step}
    return out


def _diagnosed(cfg, module) -> list[int]:
    """The hidden-state indices a logging step diagnoses, as the logging hook chooses them."""
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..diagnostics import diagnosed_layers

    return diagnosed_layers(module.num_layers, cfg.log.diag_layers, module.student_layers)


def _versus_trl(sm, cfg, policy, tok, source, fmt) -> dict:
    """Ours (the shared prompt once, the default) and ours with whole rows (`grpo.shared_prompt=false`)
    against TRL's GRPOTrainer on the same work, the three in a rotated order each round."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not installed (pip install -e '.[bench]')"}
    whole = copy.deepcopy(cfg)
    whole.grpo.shared_prompt = False
    arms = {"ours": lambda r, d: ours_fit(sm, cfg, source, d, r, fmt),
            "whole_rows": lambda r, d: ours_fit(sm, whole, source, d, r, fmt),
            "trl": lambda r, d: trl_fit(sm, cfg, source, d, r, fmt)}
    fits: dict[str, list] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory(prefix="oisd_bench_smol_trl_") as tmp:
        model_dir = Path(tmp) / "model"
        policy.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        for r in range(sm.repeats):
            for name in rotated(tuple(arms), r):
                fits[name].append(arms[name](r, model_dir)[1:])
    ours, theirs, whole_rows = fits["ours"], fits["trl"], fits["whole_rows"]
    out = {f"{name}_mean_completion_length": stats([median_of(x, "completions/mean_length") for x in fits[name]])
           for name in arms}
    for c in ("cpu", "wall"):
        ratio = lambda a, b, c=c: median_of(a, c) / median_of(b, c)  # noqa: E731
        out[c] = {"ours_step_s": stats([median_of(x, c) for x in ours]),
                  "whole_rows_step_s": stats([median_of(x, c) for x in whole_rows]),
                  "trl_step_s": stats([median_of(x, c) for x in theirs]),
                  "ratio_ours_vs_trl": per_round(ours, theirs, ratio),
                  "ratio_whole_rows_vs_trl": per_round(whole_rows, theirs, ratio),
                  "ratio_ours_vs_whole_rows": per_round(ours, whole_rows, ratio),
                  "ours_optimise_s": stats([median_of(x, f"optimise_{c}") for x in ours]),
                  "whole_rows_optimise_s": stats([median_of(x, f"optimise_{c}") for x in whole_rows]),
                  "ours_rollout_s": stats([median_of(x, f"rollout_{c}") for x in ours]),
                  "trl_generate_s": stats([median_of(x, f"generate_{c}") for x in theirs])}
    return out


def _memory(s: Settings, policy, tok, source, fmt) -> dict:
    """Peak bytes of one loss forward+backward (one micro-batch) at `smol_mem_len`-token completions."""
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..synthetic import VocabOnly, synthetic_rollout

    rows, length = s.smol_mem_rows, s.smol_mem_len
    sm = replace(smol_settings(s), max_len=length, micro=rows, prompts=max(rows // s.smol_generations, 1))
    rollout = synthetic_rollout(VocabOnly(len(tok)), rows, 40, length, s.seed)
    adv = torch.linspace(-1.5, 1.5, rows)
    norm = dict(num_items_in_batch=rollout.completion_mask.sum(), num_sequences=rows, max_completion_length=length)
    out = {"rows": rows, "completion_length": length, "prompt_length": 40,
           "logits_bytes": rows * length * len(tok) * 4, "per_preset": {}}
    for m in [p for p in ("grpo", "oisd_logit", "oisd") if p in s.presets]:
        module = bench_module(bench_config(sm, m, **OVERRIDES), policy, tok, source, format_prompt=fmt)

        def step(module=module):
            policy.zero_grad(set_to_none=True)
            module.loss_terms(rollout.scored(adv), norm)["loss/total"].backward()

        out["per_preset"][m] = {"peak_bytes": profiler_peak(step)}
        policy.zero_grad(set_to_none=True)
    base = out["per_preset"]["grpo"]["peak_bytes"]
    for v in out["per_preset"].values():
        v["ratio_vs_grpo"] = v["peak_bytes"] / base
    return out
