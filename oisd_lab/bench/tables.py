"""Targets judged on the results, and the printed tables."""

from __future__ import annotations

from .common import stats


def targets(result: dict) -> list[dict]:
    """Each target of benchmarks/README.md, judged on the median (CPU and wall clocks separately)."""
    out = []

    def add(name, clock, st, limit):
        if st and st.get("median") is not None:
            out.append({"target": name, "clock": clock, "value": st["median"], "spread": [st["min"], st["max"]],
                        "limit": limit, "met": bool(st["median"] <= limit)})

    for c in ("cpu", "wall"):
        for m, v in result.get("presets", {}).get("per_preset", {}).items():
            if m != "grpo":
                add(f"{m} optimisation step / grpo", c, v[c]["ratio_opt_vs_grpo"], 1.10)
                add(f"{m} full step / grpo", c, v[c]["ratio_full_vs_grpo"], 1.10)
        trl = result.get("trl", {}).get(c)
        if trl:
            add("grpo step / TRL GRPOTrainer step", c, trl["ratio_ours_vs_trl"], 1.0)
        attn = result.get("attn512", {}).get("per_preset", {}).get("oisd_attn")
        if attn:
            add("oisd_attn full step / grpo (long completions)", c, attn[c]["ratio_full_vs_grpo"], 1.15)
            add("oisd_attn optimisation step / grpo (long completions)", c, attn[c]["ratio_opt_vs_grpo"], 1.15)
    for m, v in result.get("memory", {}).get("per_preset", {}).items():
        if m != "grpo":
            add(f"{m} loss peak memory / grpo", "memory", stats([v["ratio_vs_grpo"]]), 1.15)
    _smol_targets(result.get("smollm2", {}), add)
    return out


def _smol_targets(smol: dict, add) -> None:
    """SmolLM2-135M targets: forward/backward <= 1.25x grpo and full step below 1.25x for every
    preset, our GRPO step <= 0.67x TRL's, diagnostics amortised <= 5% of a step."""
    for c in ("cpu", "wall"):
        for m, v in smol.get("presets", {}).get("per_preset", {}).items():
            if m != "grpo":
                add(f"smollm2 {m} forward/backward / grpo", c, v[c]["ratio_fb_vs_grpo"], 1.25)
                add(f"smollm2 {m} full step / grpo", c, v[c]["ratio_full_vs_grpo"], 1.25)
        trl = smol.get("trl", {}).get(c)
        if trl:
            add("smollm2 grpo step / TRL GRPOTrainer step", c, trl["ratio_ours_vs_trl"], 0.67)
        diag = smol.get("diagnostics", {}).get(c)
        if diag:
            add("smollm2 diagnostics amortised / step", c, stats([diag["amortised_share_of_step"]]), 0.05)


def _fmt(st: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if not st or st.get("median") is None:
        return "-"
    return f"{st['median'] * scale:.{digits}f} [{st['min'] * scale:.{digits}f}, {st['max'] * scale:.{digits}f}]"


def _preset_lines(pre: dict) -> list[str]:
    lines = []
    for c in ("cpu", "wall"):
        lines += ["", f"per-step time (s, {c}), full steps:",
                  f"{'preset':<14} " + " ".join(f"{k:<22}" for k in
                                                ("rollout", "scoring", "fwd/bwd", "alignment", "logging", "step"))]
        for m, v in pre.items():
            b = v[c]["breakdown_s"]
            lines.append(f"{m:<14} " + " ".join(f"{_fmt(b[k]):<22}" for k in
                                               ("rollout", "scoring", "forward_backward", "alignment", "logging",
                                                "step")))
    for c in ("cpu", "wall"):
        lines += ["", f"{'preset (' + c + ')':<14} {'opt step / grpo':<24} {'full step / grpo':<24} "
                      f"{'rollout tok/s':<20}"]
        for m, v in pre.items():
            lines.append(f"{m:<14} {_fmt(v[c]['ratio_opt_vs_grpo']):<24} {_fmt(v[c]['ratio_full_vs_grpo']):<24} "
                         f"{_fmt(v[c]['rollout_tokens_per_s'], digits=0):<20}")
    return lines


def _other_lines(result: dict) -> list[str]:
    lines = []
    mem = result.get("memory", {}).get("per_preset")
    if mem:
        lines += ["", f"loss forward+backward peak memory (V={result['memory']['vocab_size']}, "
                      f"{result['memory']['completion_tokens']} completion tokens):",
                  f"{'preset':<14} {'profiler MiB':>14} {'ratio':>8} {'RSS MiB':>10} {'ratio':>8}"]
        for m, v in mem.items():
            lines.append(f"{m:<14} {v['peak_bytes'] / 2**20:>14.0f} {v['ratio_vs_grpo']:>8.3f} "
                         f"{v['rss_peak_bytes'] / 2**20:>10.0f} {v['rss_ratio_vs_grpo']:>8.3f}")
    a = result.get("attn512", {})
    if a.get("per_preset"):
        for c in ("cpu", "wall"):
            lines += ["", f"long completions ({a['completion_length']} tokens, batch {a['batch']}, {c}), "
                          f"generation {_fmt(a['generate_s'][c])} s:",
                      f"{'preset':<14} {'opt step s':<24} {'opt / grpo':<24} {'full / grpo':<24}"]
            for m, v in a["per_preset"].items():
                lines.append(f"{m:<14} {_fmt(v[c]['opt_step_s']):<24} {_fmt(v[c]['ratio_opt_vs_grpo']):<24} "
                             f"{_fmt(v[c]['ratio_full_vs_grpo']):<24}")
    t = result.get("trl", {})
    if "cpu" in t:
        lines += ["", "same GRPO work, per-step time (s):"]
        for c in ("cpu", "wall"):
            lines.append(f"  {c:<5} oisd-lab {_fmt(t[c]['ours_step_s'])}  TRL {_fmt(t[c]['trl_step_s'])}  "
                         f"ratio {_fmt(t[c]['ratio_ours_vs_trl'])}  (generation: ours {_fmt(t[c]['ours_rollout_s'])}"
                         f", TRL {_fmt(t[c]['trl_generate_s'])})")
        lines.append(f"  mean completion length: oisd-lab {_fmt(t['ours_mean_completion_length'], digits=1)}  "
                     f"TRL {_fmt(t['trl_mean_completion_length'], digits=1)}")
    elif t.get("skipped"):
        lines += ["", f"trl: skipped ({t['skipped']})"]
    return lines + _smol_lines(result.get("smollm2"))


def _smol_lines(smol: dict | None) -> list[str]:
    if not smol:
        return []
    b, f = smol["batch"], smol["floor"]
    lines = ["", f"{smol['model']}: {smol['num_layers']} layers, V={smol['vocab_size']}, "
                 f"{b['prompts']} prompts x {b['generations']} completions x {b['max_completion_length']} tokens; "
                 f"floor of one extra unembedding: {f['floor_per_token']:.3f} per token, "
                 f"{f['floor_this_batch']:.3f} for this batch (prompt {f['prompt_len']} tokens)"]
    pre = smol["presets"]
    for c in ("cpu", "wall"):
        lines.append(f"  decoding ({c}): ours {_fmt(pre['decode_s']['ours'][c])} s, model.generate "
                     f"{_fmt(pre['decode_s']['hf'][c])} s, ratio {_fmt(pre['decode_ours_vs_hf'][c])}")
        lines.append(f"  {'preset (' + c + ')':<16} {'fwd/bwd s':<24} {'fwd/bwd / grpo':<24} {'full / grpo':<24}")
        for m, v in pre["per_preset"].items():
            lines.append(f"  {m:<16} {_fmt(v[c]['forward_backward_s']):<24} {_fmt(v[c]['ratio_fb_vs_grpo']):<24} "
                         f"{_fmt(v[c]['ratio_full_vs_grpo']):<24}")
        d = smol["diagnostics"][c]
        lines.append(f"  diagnostics ({c}): {d['diagnostics_per_log_step_s']:.2f} s per logging step, full step "
                     f"{d['full_step_s']:.2f} s, amortised over {smol['diagnostics']['log_every_n_steps']} steps: "
                     f"{100 * d['amortised_share_of_step']:.1f}% of a step")
        t = smol["trl"].get(c)
        if t:
            lines.append(f"  same GRPO work ({c}): oisd-lab {_fmt(t['ours_step_s'])} s, TRL {_fmt(t['trl_step_s'])} s,"
                         f" ratio {_fmt(t['ratio_ours_vs_trl'])}")
    mem = smol["memory"]
    lines.append(f"  loss peak memory ({mem['rows']} x {mem['completion_length']} completion tokens): " + ", ".join(
        f"{m} {v['peak_bytes'] / 2**20:.0f} MiB ({v['ratio_vs_grpo']:.3f}x)" for m, v in mem["per_preset"].items()))
    return lines


def format_tables(result: dict) -> str:
    meta = result["meta"]
    lines = [f"machine: {meta['cpu']}, nproc {meta['nproc']}, torch threads {meta['torch_threads']}, "
             f"load avg at start {tuple(round(x, 2) for x in meta['load_avg'])}",
             "values: median [min, max] over rounds; cpu = process CPU seconds, wall = elapsed seconds"]
    if result.get("presets", {}).get("per_preset"):
        lines += _preset_lines(result["presets"]["per_preset"])
    lines += _other_lines(result)
    if result.get("targets"):
        lines += ["", "targets (median):"]
        lines += [f"  {'met ' if x['met'] else 'MISS'} [{x['clock']:<6}] {x['target']}: {x['value']:.3f} "
                  f"[{x['spread'][0]:.3f}, {x['spread'][1]:.3f}] (<= {x['limit']})" for x in result["targets"]]
    return "\n".join(lines)
