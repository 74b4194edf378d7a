"""The paper recipe's own file (`--config paper/qwen3-4b-oisd`) on 2 CPU ranks (FSDP2 over gloo):
a Qwen3-architecture model with the recipe's depth (36 layers) and the real 151,936-token
vocabulary but width 64, trained for 2 steps with only size overrides, the local model and data
paths an offline machine passes (as the recipe's header says), and `log.plan=true`.

    OMP_NUM_THREADS=1 python benchmarks/paper_recipe_cpu.py --out benchmarks/results/paper_recipe_cpu.json
    OMP_NUM_THREADS=1 python benchmarks/paper_recipe_cpu.py --extra log.gradient_view=false \
        --out benchmarks/results/paper_recipe_cpu_no_gradient_view.json

The model is written with random weights into a temporary folder with a tokenizer of exactly
151,936 tokens: Qwen3's own tokenizer is not on this machine, so it is the package's character
tokenizer (printable ASCII) padded with `<|extra_N|>` tokens, and a ChatML chat template (the
recipe sets `model.chat_template: true`). The task is the MATH-500 / MATH-train schema from the
test fixtures (8 and 4 problems). The command runs as a user runs it (`python -m oisd_lab train`);
Lightning starts the second rank. Recorded: wall time of the command, each rank's peak resident
set (VmHWM, polled from /proc), the plan's per-rank peak and phases (plan.json) and the measured
phase peaks beside them (memory.json for rank 0, memory.rank1.json for rank 1). Both steps are
logging steps (the first and the last); with the gradient view on (the default) each rank holds the full parameters and one
gradient buffer per loss term through them, which the plan counts as a logging step; the second
command turns the view off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
VOCAB, WIDTH, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 151_936, 64, 36, 4, 2, 16
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SIZE = ["max_steps=2", "checkpoint_every=2", "grpo.prompts_per_step=2", "grpo.num_generations=2",
        "grpo.micro_batch_size=2", "grpo.max_completion_length=8", "task.num_test=2", "eval.k=1",
        "eval.max_new_tokens=8", "eval.batch_size=2", "accelerator=cpu", "devices=2", "num_threads=1"]


def build_model(folder: Path) -> dict:
    """A randomly initialised Qwen3 of the recipe's depth and vocabulary, and its tokenizer."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from oisd_lab.models import BOS, CHARS, EOS, PAD

    names = [PAD, BOS, EOS, *CHARS]
    names += [f"<|extra_{i}|>" for i in range(VOCAB - len(names))]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=PAD)
    tok.padding_side, tok.model_max_length, tok.chat_template = "left", 4096, CHATML
    assert len(tok) == VOCAB
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=4096, rope_theta=1_000_000.0, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"architecture": "Qwen3ForCausalLM", "vocab_size": VOCAB, "hidden_size": WIDTH, "num_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "tie_word_embeddings": True, "parameters": sum(p.numel() for p in model.parameters()),
            "tokenizer": f"character tokenizer padded to {VOCAB} tokens (Qwen3's own tokenizer is not available offline)"}


def _tree(pid: int) -> list[int]:
    """pid and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def _hwm(pid: int) -> tuple[int | None, str]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None, ""
    kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    rank = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"LOCAL_RANK=")), "0")
    return (kb * 1024 if kb is not None else None), rank


def run(command: list[str], env: dict, log: Path) -> tuple[int, float, dict[str, int]]:
    """Run the command; returns its exit status, wall seconds and each rank's peak RSS in bytes."""
    peaks: dict[str, int] = {}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            for pid in _tree(proc.pid):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}/cmdline").exists() else b""
                if b"oisd_lab" not in cmdline:  # only the ranks, not helper processes
                    continue
                hwm, rank = _hwm(pid)
                if hwm is not None:
                    peaks[rank] = max(peaks.get(rank, 0), hwm)
            time.sleep(0.2)
    return proc.returncode, time.perf_counter() - started, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides (e.g. log.gradient_view=false)")
    parser.add_argument("--keep", type=Path, default=None, help="run folder to keep (default: a temporary one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="paper_cpu_"))
    model_dir, run_dir = work / "qwen3-w64-l36", args.keep or work / "run"
    model = build_model(model_dir)
    overrides = [f"model.name={model_dir}", f"task.path={FIXTURES / 'math500.jsonl'}",
                 f"task.train_data={FIXTURES / 'math_train.jsonl'}", *SIZE, *args.extra, "log.plan=true",
                 "log.wandb_mode=disabled", f"run_dir={run_dir}"]
    command = [sys.executable, "-m", "oisd_lab", "train", "--config", "paper/qwen3-4b-oisd", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "OISD_LAB_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    rc, wall, peaks = run(command, env, work / "train.log")
    tail = (work / "train.log").read_text().splitlines()[-30:]
    result = {"command": "oisd-lab train --config paper/qwen3-4b-oisd " + " ".join(
        o for o in overrides if not o.startswith(("model.name=", "task.path=", "task.train_data=", "run_dir="))),
        "model": model, "exit_status": rc, "wall_seconds": round(wall, 1),
        "peak_rss_bytes_per_rank": dict(sorted(peaks.items()))}
    if rc != 0:
        result["log_tail"] = tail
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        result["steps_logged"] = [r["step"] for r in rows]
        for key in ("reward", "frac_reward_zero_std", "grad_norm", "grad/policy/norm", "grad/think/norm"):
            result[key] = [r.get(key) for r in rows]
        result["step_time"] = [r.get("step_time") for r in rows]
    for name in ("plan.json", "memory.json", "memory.rank1.json", "eval.json"):
        if (run_dir / name).is_file():
            result[name.removesuffix(".json")] = json.loads((run_dir / name).read_text())
    for rank, key in ((0, "memory"), (1, "memory.rank1")):
        if "plan" in result and key in result:
            phases = result[key]["phases"]
            measured = max(row["measured_bytes"] for row in phases.values())
            planned = result["plan"]["peak_bytes"]
            result[f"planned_vs_measured_rank{rank}"] = {
                "planned_peak_bytes": planned, "measured_peak_bytes": measured, "ratio": measured / planned,
                "per_phase_ratio": {k: row["ratio"] for k, row in phases.items()},
                "note": f"tensor bytes ({key}.json: parameters, gradients, optimizer state held + the profiler's "
                        f"peak inside the phase), rank {rank}, first 2 steps (the diagnostics pass runs on rank 0 "
                        "only); peak RSS also counts the interpreter, libraries, the tokenizer, the held-out "
                        "evaluation and the planner's own tracing"}
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text[:4000])
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
