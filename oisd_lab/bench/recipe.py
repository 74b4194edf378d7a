"""The paper recipe's own file (`--config paper/qwen3-4b-oisd`) run as a user runs it, on several
ranks (FSDP2): a randomly initialised Qwen3 with the recipe's 151,936-token vocabulary at a chosen
width and depth, written into a folder with a tokenizer of exactly that many tokens, trained for a
few steps with only size overrides, local model and data paths and `log.plan=true`.

Qwen3's own tokenizer is not available offline, so the tokenizer is the package's character
tokenizer (printable ASCII) padded with `<|extra_N|>` tokens, with a ChatML chat template (the
recipe sets `model.chat_template: true`); the task is the MATH-500 / MATH-train schema of the test
fixtures. Recorded: the command's exit status and wall time, each rank's peak resident set
(VmHWM, polled from /proc), the logged steps, and per rank the plan's peak beside the measured
phase peaks (plan.json, memory.json for rank 0, memory.rank<N>.json for the others).

Used by `benchmarks/paper_recipe_cpu.py` (2 CPU ranks, the recipe's 36 layers at width 64) and by
the GPU check's sharded part (`oisd_lab/bench/gpu.py`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..run.folder import RunDir, read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
VOCAB = 151_936
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class Shape:
    """A Qwen3 with the recipe's vocabulary: width, depth and heads."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int = VOCAB


CPU_SHAPE = Shape(64, 36, 4, 2, 16, 128)
"""The recipe's depth at width 64 (benchmarks/paper_recipe_cpu.py)."""


def write_qwen3(folder: Path, shape: Shape) -> dict:
    """A randomly initialised Qwen3 of `shape` (tied embeddings, seed 0) and its tokenizer, saved to `folder`."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    # on use: the package's tokenizer alphabet, loaded with the model-writing code
    from ..models import BOS, CHARS, EOS, PAD

    names = [PAD, BOS, EOS, *CHARS]
    names += [f"<|extra_{i}|>" for i in range(shape.vocab_size - len(names))]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=PAD)
    tok.padding_side, tok.model_max_length, tok.chat_template = "left", 4096, CHATML
    assert len(tok) == shape.vocab_size
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                         num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                         head_dim=shape.head_dim, max_position_embeddings=4096, rope_theta=1_000_000.0,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"architecture": "Qwen3ForCausalLM", **asdict(shape), "tie_word_embeddings": True,
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokenizer": f"character tokenizer padded to {shape.vocab_size} tokens "
                         "(Qwen3's own tokenizer is not available offline)"}


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


def run_command(command: list[str], env: dict, log: Path, timeout: float | None = None) -> tuple[int, float, dict]:
    """Run the command; returns its exit status (None if it ran past `timeout` and was killed), wall
    seconds and each rank's peak RSS in bytes."""
    peaks: dict[str, int] = {}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if timeout is not None and time.perf_counter() - started > timeout:
                os.killpg(proc.pid, 9)
                proc.wait()
                return None, time.perf_counter() - started, peaks
            for pid in _tree(proc.pid):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}/cmdline").exists() else b""
                if b"oisd_lab" not in cmdline:  # only the ranks, not helper processes
                    continue
                hwm, rank = _hwm(pid)
                if hwm is not None:
                    peaks[rank] = max(peaks.get(rank, 0), hwm)
            time.sleep(0.2)
    return proc.returncode, time.perf_counter() - started, peaks


def train_env(cache: Path) -> dict:
    """The train command's environment: offline, one thread per rank, the package on the path."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "WANDB_MODE": "disabled", "OISD_LAB_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def train_run(train_args: list[str], shown: str, work: Path, name: str, timeout: float | None = None) -> dict:
    """`python -m oisd_lab train TRAIN_ARGS` in `train_env`, its output in work/<name>.log: the
    command as shown (`shown`), exit status, wall seconds, each rank's peak RSS, and the log's tail
    when it failed."""
    log = work / f"{name}.log"
    rc, wall, peaks = run_command([sys.executable, "-m", "oisd_lab", "train", *train_args],
                                  train_env(work / "cache"), log, timeout)
    out = {"command": f"oisd-lab train {shown}", "exit_status": rc, "wall_seconds": round(wall, 1),
           "peak_rss_bytes_per_rank": dict(sorted(peaks.items()))}
    if rc != 0:
        out["log_tail"] = log.read_text().splitlines()[-30:]
    return out


def metrics_summary(run_dir: Path) -> dict:
    """The logged steps and the figures that say whether the step ran and gradients flowed."""
    rows = read_jsonl(RunDir(run_dir).metrics)
    if not rows:
        return {}
    out = {"steps_logged": [r["step"] for r in rows]}
    for key in ("reward", "frac_reward_zero_std", "grad_norm", "grad/policy/norm", "grad/think/norm", "step_time"):
        out[key] = [r.get(key) for r in rows]
    return out


def planned_vs_measured(plan: dict, memories: dict[str, dict]) -> dict:
    """Per rank (memories: the run's memory files by name, `memory` for rank 0, `memory.rank<r>`):
    the plan's peak, the measured peak over the measured phases, and each phase's ratio."""
    if not plan:
        return {}
    out = {}
    for name, memory in memories.items():
        phases = memory["phases"]
        measured = max(row["measured_bytes"] for row in phases.values())
        rank = name.removeprefix("memory").removeprefix(".rank") or "0"
        out[f"rank{rank}"] = {"planned_peak_bytes": plan["peak_bytes"], "measured_peak_bytes": measured,
                              "ratio": measured / plan["peak_bytes"],
                              "per_phase_ratio": {k: row["ratio"] for k, row in phases.items()}}
    return out


def recipe_run(work: Path, shape: Shape, size: list[str], ranks: int, extra: list[str] = (),
               run_dir: Path | None = None, timeout: float | None = None) -> dict:
    """Write the model, run `oisd-lab train --config paper/qwen3-4b-oisd` with `size` overrides, and collect."""
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"qwen3-w{shape.hidden_size}-l{shape.num_layers}"
    run = RunDir(run_dir or work / "run")
    model = write_qwen3(model_dir, shape)
    local = [f"model.name={model_dir}", f"task.path={FIXTURES / 'math500.jsonl'}",
             f"task.train_data={FIXTURES / 'math_train.jsonl'}", f"run_dir={run.root}"]
    overrides = [*size, *extra, "log.plan=true", "log.wandb_mode=disabled"]
    config = ["--config", "paper/qwen3-4b-oisd"]
    result = train_run([*config, *local, *overrides], " ".join([*config, *overrides]), work, "train", timeout)
    result = {"command": result.pop("command"), "model": model, **result, **metrics_summary(run.root)}
    for path in (run.plan, run.eval):
        if path.is_file():
            result[path.stem] = read_json(path)
    memories = {run.memory_of(r).stem: read_json(run.memory_of(r)) for r in range(ranks) if run.memory_of(r).is_file()}
    result.update(memories)
    result["planned_vs_measured"] = planned_vs_measured(result.get("plan", {}), memories)
    return result
