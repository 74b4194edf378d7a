"""Markdown tables from `oisd-lab bench` result files (the tables in benchmarks/README.md).

    python benchmarks/report.py benchmarks/results/bench.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def fmt(st, digits=3, scale=1.0):
    if not st or st.get("median") is None:
        return "-"
    return f"{st['median'] * scale:.{digits}f} [{st['min'] * scale:.{digits}f}, {st['max'] * scale:.{digits}f}]"


def presets(r):
    out = []
    for c in ("cpu", "wall"):
        out += [f"\nPer-step time, full steps ({c} seconds), median [min, max] over rounds:\n",
                "| preset | rollout | scoring | forward/backward | of which alignment | logging | step |",
                "|---|---|---|---|---|---|---|"]
        for m, v in r["per_preset"].items():
            b = v[c]["breakdown_s"]
            out.append(f"| {m} | " + " | ".join(fmt(b[k]) for k in ("rollout", "scoring", "forward_backward",
                                                                      "alignment", "logging", "step")) + " |")
    out += ["\nRatios to grpo (paired per round), rollout throughput:\n",
            "| preset | opt step / grpo (cpu) | opt step / grpo (wall) | full step / grpo (cpu) | "
            "full step / grpo (wall) | rollout tokens/s (wall) |", "|---|---|---|---|---|---|"]
    for m, v in r["per_preset"].items():
        out.append(f"| {m} | {fmt(v['cpu']['ratio_opt_vs_grpo'])} | {fmt(v['wall']['ratio_opt_vs_grpo'])} | "
                   f"{fmt(v['cpu']['ratio_full_vs_grpo'])} | {fmt(v['wall']['ratio_full_vs_grpo'])} | "
                   f"{fmt(v['wall']['rollout_tokens_per_s'], 0)} |")
    d = r["per_preset"]["grpo"]["cpu"]["diagnostics_per_log_step_s"]
    out.append(f"\nPer-layer diagnostics on a logging step: {fmt(d)} s cpu (every "
               f"{r['log_every_n_steps']} steps; amortised into `logging` above).")
    return out


def memory(r):
    out = [f"\nLoss forward+backward peak (V={r['vocab_size']}, {r['batch']} x {r['completion_length']} = "
           f"{r['completion_tokens']} completion tokens, prompt {r['prompt_length']}):\n",
           "| preset | profiler peak MiB | / grpo | RSS peak MiB | / grpo |", "|---|---|---|---|---|"]
    for m, v in r["per_preset"].items():
        out.append(f"| {m} | {v['peak_bytes'] / 2**20:.0f} | {v['ratio_vs_grpo']:.3f} | "
                   f"{v['rss_peak_bytes'] / 2**20:.0f} | {v['rss_ratio_vs_grpo']:.3f} |")
    return out


def attn(r):
    out = [f"\nLong completions ({r['completion_length']} tokens, batch {r['batch']}, micro-batch "
           f"{r['micro_batch_size']}); generating the batch takes {fmt(r['generate_s']['cpu'])} s cpu, "
           f"{fmt(r['generate_s']['wall'])} s wall:\n",
           "| preset | opt step s (cpu) | opt / grpo (cpu) | full / grpo (cpu) | opt / grpo (wall) | full / grpo (wall) |",
           "|---|---|---|---|---|---|"]
    for m, v in r["per_preset"].items():
        out.append(f"| {m} | {fmt(v['cpu']['opt_step_s'])} | {fmt(v['cpu']['ratio_opt_vs_grpo'])} | "
                   f"{fmt(v['cpu']['ratio_full_vs_grpo'])} | {fmt(v['wall']['ratio_opt_vs_grpo'])} | "
                   f"{fmt(v['wall']['ratio_full_vs_grpo'])} |")
    return out


def trl(r):
    out = ["\n| clock | oisd-lab step s | TRL step s | oisd-lab / TRL | oisd-lab generation s | TRL generation s |",
           "|---|---|---|---|---|---|"]
    for c in ("cpu", "wall"):
        t = r[c]
        out.append(f"| {c} | {fmt(t['ours_step_s'])} | {fmt(t['trl_step_s'])} | {fmt(t['ratio_ours_vs_trl'])} | "
                   f"{fmt(t['ours_rollout_s'])} | {fmt(t['trl_generate_s'])} |")
    out.append(f"\nMean completion length: oisd-lab {fmt(r['ours_mean_completion_length'], 1)}, "
               f"TRL {fmt(r['trl_mean_completion_length'], 1)}.")
    return out


def smollm2(r):
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
        out.append(f"| {m} | {fmt(v['cpu']['forward_backward_s'])} | {fmt(v['cpu']['ratio_fb_vs_grpo'])} | "
                   f"{fmt(v['cpu']['ratio_full_vs_grpo'])} | {fmt(v['wall']['ratio_fb_vs_grpo'])} | "
                   f"{fmt(v['wall']['ratio_full_vs_grpo'])} |")
    out += ["\n| decoding (full length) | ours s | `model.generate` s | ours / generate |", "|---|---|---|---|"]
    for c in ("cpu", "wall"):
        out.append(f"| {c} | {fmt(pre['decode_s']['ours'][c])} | {fmt(pre['decode_s']['hf'][c])} | "
                   f"{fmt(pre['decode_ours_vs_hf'][c])} |")
    d = r["diagnostics"]
    out += ["\n| diagnostics (one logging step) | s | full step s | amortised over "
            f"{d['log_every_n_steps']} steps |", "|---|---|---|---|"]
    for c in ("cpu", "wall"):
        out.append(f"| {c} | {d[c]['diagnostics_per_log_step_s']:.2f} | {d[c]['full_step_s']:.2f} | "
                   f"{100 * d[c]['amortised_share_of_step']:.1f}% |")
    if "cpu" in r["trl"]:
        out += trl(r["trl"])
    m = r["memory"]
    out += [f"\nLoss forward+backward peak, {m['rows']} x {m['completion_length']} completion tokens "
            f"(prompt {m['prompt_length']}; one logits tensor is {m['logits_bytes'] / 2**20:.0f} MiB):\n",
            "| preset | profiler peak MiB | / grpo |", "|---|---|---|"]
    out += [f"| {k} | {v['peak_bytes'] / 2**20:.0f} | {v['ratio_vs_grpo']:.3f} |" for k, v in m["per_preset"].items()]
    return out


def main() -> None:
    for path in sys.argv[1:]:
        result = json.loads(open(path).read())
        meta = result["meta"]
        print(f"\n### {path}\n\n{meta['date']}, {meta['cpu']}, nproc {meta['nproc']}, torch threads "
              f"{meta['torch_threads']}, init {meta['settings'].get('init', 'random')}")
        for name, fn in (("presets", presets), ("memory", memory), ("attn512", attn), ("trl", trl),
                         ("smollm2", smollm2)):
            if name in result and "skipped" not in result[name]:
                load = result[name]["load_avg"]
                print("\n".join(fn(result[name])))
                print(f"\nLoad average (1, 5, 15 min) at start {[round(x, 2) for x in load['start']]}, "
                      f"at end {[round(x, 2) for x in load['end']]}.")
        if result.get("targets"):
            print("\n| target | clock | median [min, max] | limit | met |\n|---|---|---|---|---|")
            for t in result["targets"]:
                print(f"| {t['target']} | {t['clock']} | {t['value']:.3f} [{t['spread'][0]:.3f}, "
                      f"{t['spread'][1]:.3f}] | {t['limit']} | {'yes' if t['met'] else 'no'} |")


if __name__ == "__main__":
    main()
