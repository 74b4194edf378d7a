"""A logging step's per-layer diagnostics on SmolLM2-135M, before and after the fused lens metrics.

In one process, in paired rounds (order alternating): `LogStepHook.diagnose` on one rollout of the
`smollm2` bench batch (4 prompts x 4 completions x 64 tokens, `task=word`), once with the plain
per-layer lens metrics (`kl_from_logits`, `jsd`, `entropy_from_logits` on the lens logits) and
once with `losses.lens_divergences`; the snapshot of the same step is timed once per round. CPU
seconds (`time.process_time`) with 1 torch thread; `uptime` load before and after.

    PYTHONPATH=. python benchmarks/smollm2_diagnostics.py --rounds 2 --out results.json

The rollout runs to full length (1,024 completion tokens): the most a logging step of this batch
diagnoses. `--fit` instead runs the `smollm2` bench's own measurement (`_diagnostics`: two `grpo`
steps with the logging hook, sampled with EOS), with `--plain` on the plain lens metrics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from oisd_lab import diagnostics, losses
from oisd_lab.bench.common import NoEos, Settings, bench_config, bench_module
from oisd_lab.bench.smollm2 import OVERRIDES, _decode_ours, _diagnosed, _diagnostics, smol_settings
from oisd_lab.run.folder import RunDir
from oisd_lab.run_hooks import LogStepHook

FUSED = diagnostics._lens_token_metrics


def plain_lens_token_metrics(readout, hidden, final, tokens, chunk):
    """The per-layer lens metrics as computed before `losses.lens_divergences` (the baseline)."""
    L = readout.num_layers
    out = {k: defaultdict(list) for k in hidden}
    for lo in range(0, final.shape[0], chunk):
        teacher = readout.logits(final[lo : lo + chunk], L).float()
        top, tok = teacher.argmax(-1), tokens[lo : lo + chunk]
        for k, h in hidden.items():
            lens = teacher if k == L else readout.logits(h[lo : lo + chunk], k).float()
            arg = lens.argmax(-1)
            out[k]["lens_acc"].append((arg == tok).float())
            out[k]["agree_top1"].append((arg == top).float())
            out[k]["kl"].append(losses.kl_from_logits(teacher, lens))
            out[k]["jsd"].append(losses.jsd(teacher, lens))
            out[k]["entropy"].append(losses.entropy_from_logits(lens))
    return {k: {name: torch.cat(v) for name, v in d.items()} for k, d in out.items()}


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return result, {"cpu": time.process_time() - c0, "wall": time.perf_counter() - w0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fit", action="store_true")
    ap.add_argument("--plain", action="store_true", help="with --fit: the plain lens metrics")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from oisd_lab.models import load_pretrained
    from oisd_lab.sources import load_source

    sm = smol_settings(Settings())
    policy, tok = load_pretrained(sm.smol_model)
    policy.eval()
    cfg = bench_config(sm, "grpo", **OVERRIDES)
    source = load_source(cfg.task)
    if args.fit:
        fmt = lambda text: source.format_prompt(text, tok, chat=True)  # noqa: E731
        load = _load()
        diagnostics._lens_token_metrics = plain_lens_token_metrics if args.plain else FUSED
        out = _diagnostics(sm, cfg, policy, tok, source, fmt)
        args.out.write_text(json.dumps({**out, "lens_metrics": "plain" if args.plain else "fused", "threads": torch.get_num_threads(), "load_before": load,
                                        "load_after": _load()}, indent=1))
        return
    prompts = [source.format_prompt(p.prompt, tok, chat=True) for p in source.train_batch(0, sm.prompts, sm.seed)]
    torch.manual_seed(sm.seed)
    rollout = _decode_ours(policy, NoEos(tok), prompts, sm)
    module = bench_module(cfg, policy, tok, source)
    view = module.policy_view()
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(len(rollout), generator=g) > 0.5).float()
    adv = rewards - rewards.view(-1, sm.generations).mean(1).repeat_interleave(sm.generations)
    out = {"model": sm.smol_model, "threads": torch.get_num_threads(), "rows": len(rollout),
           "completion_tokens": int(rollout.completion_mask.sum()), "layers_diagnosed": _diagnosed(cfg, module),
           "log_every_n_steps": cfg.log.every_n_steps, "load_before": _load(), "rounds": []}
    with tempfile.TemporaryDirectory(prefix="h_diag_") as tmp:
        hook = LogStepHook(cfg, RunDir(Path(tmp)))
        results = {}
        for r in range(args.rounds):
            row = {}
            for name in (("plain", "fused") if r % 2 == 0 else ("fused", "plain")):
                diagnostics._lens_token_metrics = plain_lens_token_metrics if name == "plain" else FUSED
                results[name], row[name] = _timed(lambda: hook.diagnose(view, rollout.scored(adv, rewards)))
            diagnostics._lens_token_metrics = FUSED
            _, row["snapshot"] = _timed(lambda: hook.write_snapshot(view, 1, rollout.scored(adv, rewards)))
            row["load"] = _load()
            out["rounds"].append(row)
            print(json.dumps(row), flush=True)
    out["max_abs_diff"] = {m: max(abs(a[m] - b[m]) for a, b in zip(results["plain"], results["fused"], strict=True)
                                  if m in a) for m in diagnostics.LENS_METRICS}
    out["load_after"] = _load()
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["max_abs_diff"]))


if __name__ == "__main__":
    main()
