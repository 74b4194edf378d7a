"""Targets judged on the results, and the results as Markdown tables (one renderer: `oisd-lab
bench` prints them, `benchmarks/report.py` prints them for saved result files)."""

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


def _fmt(st: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    """median [min, max] of a `stats` entry, or "-" without one."""
    if not st or st.get("median") is None:
        return "-"
    return f"{st['median'] * scale:.{digits}f} [{st['min'] * scale:.{digits}f}, {st['max'] * scale:.{digits}f}]"


def _presets(r: dict) -> list[str]:
    out = []
    for c in ("cpu", "wall"):
        out += [f"\nPer-step time, full steps ({c} seconds), median [min, max] over rounds:\n",
                "| preset | rollout | scoring | forward/backward | of which alignment | logging | step |",
                "|---|---|---|---|---|---|---|"]
        for m, v in r["per_preset"].items():
            b = v[c]["breakdown_s"]
            out.append(f"| {m} | " + " | ".join(_fmt(b[k]) for k in ("rollout", "scoring", "forward_backward",
                                                                      "alignment", "logging", "step")) + " |")
    out += ["\nRatios to grpo (paired per round), rollout throughput:\n",
            "| preset | opt step / grpo (cpu) | opt step / grpo (wall) | full step / grpo (cpu) | "
            "full step / grpo (wall) | rollout tokens/s (wall) |", "|---|---|---|---|---|---|"]
    for m, v in r["per_preset"].items():
        out.append(f"| {m} | {_fmt(v['cpu']['ratio_opt_vs_grpo'])} | {_fmt(v['wall']['ratio_opt_vs_grpo'])} | "
                   f"{_fmt(v['cpu']['ratio_full_vs_grpo'])} | {_fmt(v['wall']['ratio_full_vs_grpo'])} | "
                   f"{_fmt(v['wall']['rollout_tokens_per_s'], 0)} |")
    if "grpo" not in r["per_preset"]:
        return out
    d = r["per_preset"]["grpo"]["cpu"]["diagnostics_per_log_step_s"]
    out.append(f"\nPer-layer diagnostics on a logging step: {_fmt(d)} s cpu (every "
               f"{r['log_every_n_steps']} steps; amortised into `logging` above).")
    return out


def _memory(r: dict) -> list[str]:
    out = [f"\nLoss forward+backward peak (V={r['vocab_size']}, {r['batch']} x {r['completion_length']} = "
           f"{r['completion_tokens']} completion tokens, prompt {r['prompt_length']}):\n",
           "| preset | profiler peak MiB | / grpo | RSS peak MiB | / grpo |", "|---|---|---|---|---|"]
    for m, v in r["per_preset"].items():
        out.append(f"| {m} | {v['peak_bytes'] / 2**20:.0f} | {v['ratio_vs_grpo']:.3f} | "
                   f"{v['rss_peak_bytes'] / 2**20:.0f} | {v['rss_ratio_vs_grpo']:.3f} |")
    return out


def _attn(r: dict) -> list[str]:
    out = [f"\nLong completions ({r['completion_length']} tokens, batch {r['batch']}, micro-batch "
           f"{r['micro_batch_size']}); generating the batch takes {_fmt(r['generate_s']['cpu'])} s cpu, "
           f"{_fmt(r['generate_s']['wall'])} s wall:\n",
           "| preset | opt step s (cpu) | opt / grpo (cpu) | full / grpo (cpu) | opt / grpo (wall) | full / grpo (wall) |",
           "|---|---|---|---|---|---|"]
    for m, v in r["per_preset"].items():
        out.append(f"| {m} | {_fmt(v['cpu']['opt_step_s'])} | {_fmt(v['cpu']['ratio_opt_vs_grpo'])} | "
                   f"{_fmt(v['cpu']['ratio_full_vs_grpo'])} | {_fmt(v['wall']['ratio_opt_vs_grpo'])} | "
                   f"{_fmt(v['wall']['ratio_full_vs_grpo'])} |")
    return out


def _trl(r: dict) -> list[str]:
    out = ["\n| clock | oisd-lab step s | TRL step s | oisd-lab / TRL | oisd-lab generation s | TRL generation s |",
           "|---|---|---|---|---|---|"]
    for c in ("cpu", "wall"):
        t = r[c]
        out.append(f"| {c} | {_fmt(t['ours_step_s'])} | {_fmt(t['trl_step_s'])} | {_fmt(t['ratio_ours_vs_trl'])} | "
                   f"{_fmt(t['ours_rollout_s'])} | {_fmt(t['trl_generate_s'])} |")
    out.append(f"\nMean completion length: oisd-lab {_fmt(r['ours_mean_completion_length'], 1)}, "
               f"TRL {_fmt(r['trl_mean_completion_length'], 1)}.")
    return out


def _smollm2(r: dict) -> list[str]:
    b, f, pre = r["batch"], r["floor"], r["presets"]
    out = [f"\n{r['model']} ({r['parameters'] / 1e6:.1f}M parameters, {r['num_layers']} layers, V = {r['vocab_size']}), "
           f"task `{b['task']}` with the chat template, {b['prompts']} prompts x {b['generations']} completions x "
           f"{b['max_completion_length']} tokens, one micro-batch; prompt {f['prompt_len']} tokens.\n",
           f"Floor of one extra unembedding: per token (L x {f['layer_macs'] / 1e6:.2f}M + {f['head_macs'] / 1e6:.1f}M) "
           f"= {f['per_token_macs'] / 1e6:.1f}M multiply-adds, + {f['head_macs'] / 1e6:.1f}M -> "
           f"{f['floor_per_token']:.3f}x; for this batch (prompt positions have no head) {f['floor_this_batch']:.3f}x.\n",
           "| preset | fwd/bwd s (cpu) | fwd/bwd / grpo (cpu) | full / grpo (cpu) | fwd/bwd / grpo (wall) | "
           "full / grpo (wall) |", "|---|---|---|---|---|---|"]
    for m, v in pre["per_preset"].items():
        out.append(f"| {m} | {_fmt(v['cpu']['forward_backward_s'])} | {_fmt(v['cpu']['ratio_fb_vs_grpo'])} | "
                   f"{_fmt(v['cpu']['ratio_full_vs_grpo'])} | {_fmt(v['wall']['ratio_fb_vs_grpo'])} | "
                   f"{_fmt(v['wall']['ratio_full_vs_grpo'])} |")
    out += ["\n| decoding (full length) | ours s | `model.generate` s | ours / generate |", "|---|---|---|---|"]
    for c in ("cpu", "wall"):
        out.append(f"| {c} | {_fmt(pre['decode_s']['ours'][c])} | {_fmt(pre['decode_s']['hf'][c])} | "
                   f"{_fmt(pre['decode_ours_vs_hf'][c])} |")
    d = r["diagnostics"]
    out += ["\n| diagnostics (one logging step) | s | full step s | amortised over "
            f"{d['log_every_n_steps']} steps |", "|---|---|---|---|"]
    for c in ("cpu", "wall"):
        out.append(f"| {c} | {d[c]['diagnostics_per_log_step_s']:.2f} | {d[c]['full_step_s']:.2f} | "
                   f"{100 * d[c]['amortised_share_of_step']:.1f}% |")
    if "cpu" in r["trl"]:
        out += _trl(r["trl"])
        if "ratio_whole_rows_vs_trl" in r["trl"]["cpu"]:
            out += ["\n| clock | whole rows step s | whole rows / TRL | shared prompt / whole rows | "
                    "optimisation s: shared prompt | whole rows |", "|---|---|---|---|---|---|"]
            for c in ("cpu", "wall"):
                t = r["trl"][c]
                out.append(f"| {c} | {_fmt(t['whole_rows_step_s'])} | {_fmt(t['ratio_whole_rows_vs_trl'])} | "
                           f"{_fmt(t['ratio_ours_vs_whole_rows'])} | {_fmt(t['ours_optimise_s'])} | "
                           f"{_fmt(t['whole_rows_optimise_s'])} |")
    m = r["memory"]
    out += [f"\nLoss forward+backward peak, {m['rows']} x {m['completion_length']} completion tokens "
            f"(prompt {m['prompt_length']}; one logits tensor is {m['logits_bytes'] / 2**20:.0f} MiB):\n",
            "| preset | profiler peak MiB | / grpo |", "|---|---|---|"]
    out += [f"| {k} | {v['peak_bytes'] / 2**20:.0f} | {v['ratio_vs_grpo']:.3f} |" for k, v in m["per_preset"].items()]
    return out


SECTIONS = (("presets", _presets), ("memory", _memory), ("attn512", _attn), ("trl", _trl), ("smollm2", _smollm2))
"""The result's sections in the order they are rendered, each with its renderer."""


def markdown(result: dict, title: str = "results") -> str:
    """The Markdown tables of an `oisd-lab bench` result (the tables in benchmarks/README.md):
    the machine, each section that ran (with the load average around it) and the targets."""
    meta = result["meta"]
    out = [f"\n### {title}\n\n{meta['date']}, {meta['cpu']}, nproc {meta['nproc']}, torch threads "
           f"{meta['torch_threads']}, init {meta['settings'].get('init', 'random')}"]
    for name, render in SECTIONS:
        section = result.get(name)
        if not section:
            continue
        if "skipped" in section:
            out.append(f"\n{name}: skipped ({section['skipped']})")
            continue
        out.append("\n".join(render(section)))
        load = section.get("load_avg")
        if load:
            out.append(f"\nLoad average (1, 5, 15 min) at start {[round(x, 2) for x in load['start']]}, "
                       f"at end {[round(x, 2) for x in load['end']]}.")
    if result.get("targets"):
        out.append("\n| target | clock | median [min, max] | limit | met |\n|---|---|---|---|---|")
        out += [f"| {t['target']} | {t['clock']} | {t['value']:.3f} [{t['spread'][0]:.3f}, "
                f"{t['spread'][1]:.3f}] | {t['limit']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    return "\n".join(out)
