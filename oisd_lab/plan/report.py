"""The plan as text: one column per phase, one row per source of memory, in GiB per device."""

from __future__ import annotations

GIB = 2**30
PHASE_NOTES = {
    "rollout": "sampling the completions",
    "diagnostics": "per-layer diagnostics (logging steps)",
    "policy step": "forward, backward, optimizer step",
}


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def format_plan(plan, memory_bytes: int | None = None) -> str:
    s = plan.setup
    lines = [
        f"memory plan: {s['model']} ({s['layers']} layers, {s['parameters'] / 1e6:,.1f}M parameters, "
        f"vocabulary {s['vocab_size']:,})",
        f"  precision {s['precision']}: parameters {s['param_dtype']}, compute {s['compute_dtype']}; "
        f"{s['strategy']}" + (f" on {s['world']} devices" if s["world"] > 1 else "") + ("" if s["gpu"] else " (CPU)"),
        f"  per device: {s['rows']} completions, micro-batch {s['micro_batch']} ({s['micro_batches']} passes), "
        f"prompt {s['prompt_length']} tokens ({s['prompt_length_source']}) + completion {s['completion_length']}",
        f"  gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}; loss weights: logit "
        f"{s['logit_weight']}, attention {s['attn_weight']}, KL beta {s['beta']}",
        f"  {plan.method} in {plan.seconds:.1f} s",
        "",
    ]
    lines += _table(plan.phases)
    lines.append("")
    lines.append(f"peak: {plan.peak_phase}, {gib(plan.peak)} GiB allocated" +
                 (f"; {gib(plan.required)} GiB with fragmentation and fixed overheads" if s["gpu"] else ""))
    if memory_bytes:
        verdict = "fits" if plan.fits(memory_bytes) else "does NOT fit"
        lines.append(f"{verdict} in {gib(memory_bytes)} GiB per device")
    lines.append("traced on fake tensors (the step's own code): everything except")
    lines += [f"  - {item}" for item in plan.estimated]
    lines += _suggestions(plan.suggestions)
    return "\n".join(lines)


def _table(phases: dict[str, dict[str, int]]) -> list[str]:
    names = list(phases)
    rows: list[str] = []
    for parts in phases.values():
        rows += [k for k in parts if k != "total" and k not in rows]
    width = max(len(r) for r in rows + ["source, GiB per device"]) + 2
    out = ["source, GiB per device".ljust(width) + "".join(f"{n:>14}" for n in names)]
    for row in rows:
        values = [phases[n].get(row) for n in names]
        if not any(values):
            continue
        out.append(("  " + row).ljust(width) + "".join(f"{gib(v) if v else '-':>14}" for v in values))
    out.append("total".ljust(width) + "".join(f"{gib(phases[n]['total']):>14}" for n in names))
    return out


def _suggestions(suggestions: list[dict]) -> list[str]:
    if not suggestions:
        return []
    out = ["", "settings that fit (planned the same way):"]
    for item in suggestions:
        out.append(f"  {' '.join(item['overrides']):<60} peak {gib(item['peak_bytes'])} GiB "
                   f"({gib(item['required_bytes'])} GiB required)")
    return out
