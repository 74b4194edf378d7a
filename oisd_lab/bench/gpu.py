"""The GPU check, `bash benchmarks/gpu/run.sh`: the paper's setting at real width, in minutes, offline.

Models are built from the real configs of Qwen3-0.6B and Qwen3-4B (the config.json files shipped
in `oisd_lab/plan/configs/`) with random weights: vocabulary, width, heads and head size are
real, the 4B's depth is cut to fit the time.
Weights are float32 and compute is bf16 (Lightning `bf16-mixed`, the paper recipe's precision),
with gradient checkpointing. Per model:

- decoding: `rollout`'s batched KV-cache loop samples fixed-length completions (EOS never
  matches) from random prompts: tokens/s and peak memory;
- per method (`grpo`, then `oisd`): Lightning steps through `OISDModule` on one fixed synthetic
  rollout batch (the optimisation step; rewards alternate so advantages are non-zero), at lr 1e-6
  with the paper recipe's optimizer. The first step is a warm-up; every step runs the per-layer
  diagnostics hook. Per phase (rollout, forward/backward + optimizer step, diagnostics): wall
  seconds after a device synchronise, and peak device memory; the fraction of weights changed;
- OISD/GRPO ratios of the optimisation step, of its peak memory, and the alignment's added time.

Then the sharded path (`strategy=fsdp`, FSDP2 over every visible GPU; `--cpu`: 2 CPU ranks over
gloo), each as a user runs it, through `python -m oisd_lab train` in a subprocess:

- `tiny`: `debug=quick method=oisd strategy=fsdp` for 3 steps (under `bf16-mixed` on GPUs), whose
  rewards differ within groups: every step's gradient norm and the alignment channel's, and that
  the exported final model loads with `from_pretrained`;
- `recipe`: the paper recipe's own file (`--config paper/qwen3-4b-oisd`) with Qwen3-4B's real width,
  heads and vocabulary at 8 of its 36 layers, the first 8 (the recipe's student is layer 6; `--cpu`:
  width 64, 8 layers), random weights, 2 steps
  with `log.plan=true`: that step 1 runs, and each rank's measured peak against the plan.

Then `pytest -m gpu` runs, and everything goes to one JSON file. `--cpu` runs the same code on a
tiny Qwen3 on CPU in seconds (the test suite does), so the check cannot rot between GPU visits.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch


def shipped_config(name: str) -> dict:
    """A model's config.json as shipped with the package (`oisd_lab/plan/configs/`), as a dict.
    Read by path: `plan` imports `bench` (its memory measure), so `bench` does not import `plan`."""
    return json.loads((Path(__file__).resolve().parents[1] / "plan" / "configs" / f"{name}.json").read_text())


QWEN3_0_6B = shipped_config("Qwen3-0.6B")
QWEN3_4B = shipped_config("Qwen3-4B")
TINY_QWEN3 = {**QWEN3_0_6B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
              "bos_token_id": 1, "eos_token_id": 2}
"""The same architecture at a size that checks the code path on CPU in seconds."""


@dataclass(frozen=True)
class Case:
    """One model and the sizes of its work."""

    name: str
    config: dict
    layers: int
    """Decoder layers built (the real depth, or fewer to fit the time)."""
    prompt_len: int
    completion_len: int
    rows: int
    """Completions per optimisation step (rows / generations prompts)."""
    generations: int
    micro: int
    decode_prompts: int
    decode_tokens: int


GPU_CASES = (
    Case("qwen3-0.6b", QWEN3_0_6B, 28, 256, 2048, 16, 8, 4, 2, 1024),
    Case("qwen3-4b", QWEN3_4B, 18, 256, 1536, 16, 8, 4, 2, 1024),
)
CPU_CASES = (Case("tiny-qwen3", TINY_QWEN3, 3, 8, 24, 8, 4, 4, 2, 16),)
LR = 1e-6
STEPS = 2
"""Timed steps per method (after one warm-up step)."""


@dataclass
class Phases:
    """Wall seconds (device synchronised) and peak device memory of each call of wrapped functions
    or each phase of the module (`observer`)."""

    device: torch.device
    seconds: dict = field(default_factory=lambda: defaultdict(list))
    peak_bytes: dict = field(default_factory=lambda: defaultdict(list))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.measured(name):
                return fn(*args, **kwargs)

        return timed

    def observer(self, names: dict[str, str]):
        """An observer of the module's phases (`OISDModule.phases`) that measures those in `names`
        (phase -> the name it is reported under)."""
        return lambda phase: self.measured(names[phase]) if phase in names else None

    @contextlib.contextmanager
    def measured(self, name: str):
        """The block's seconds and peak memory, as one call of `name`."""
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name].append(time.perf_counter() - start)
            if self.device.type == "cuda":
                self.peak_bytes[name].append(torch.cuda.max_memory_allocated(self.device))

    def summary(self, skip: int = 1) -> dict:
        """Median seconds and max peak per phase over the calls after the first `skip` (warm-up)."""
        out = {}
        for name, values in self.seconds.items():
            timed = values[skip:] or values
            peaks = self.peak_bytes.get(name, [])
            out[name] = {"seconds": statistics.median(timed), "calls": len(values),
                         "peak_bytes": max(peaks) if peaks else None}
        return out


def build_model(case: Case, device: torch.device, seed: int = 0):
    """Random float32 weights from the case's config, built on the device, checkpointing on."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..run.trainer import enable_checkpointing

    config = Qwen3Config(**{**case.config, "num_hidden_layers": case.layers})
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    enable_checkpointing(model)
    return model


def synthetic_rollout(case: Case, seed: int = 0):
    """Random prompts and completions; a quarter of the completions end early (padding)."""
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..rollout import Rollout

    gen = torch.Generator().manual_seed(seed)
    P, C, V = case.prompt_len, case.completion_len, case.config["vocab_size"]
    ids = torch.randint(0, V, (case.rows, P + C), generator=gen)
    lengths = torch.full((case.rows,), C)
    lengths[::4] = C // 2
    cmask = (torch.arange(C)[None] < lengths[:, None]).float()
    return Rollout(input_ids=ids, attention_mask=torch.cat([torch.ones(case.rows, P), cmask], 1).long(),
                   completion_mask=cmask, prompt_length=P, truncated=lengths == C,
                   texts=["right" if i % 2 else "wrong" for i in range(case.rows)])


def time_decoding(model, case: Case, device: torch.device) -> dict:
    """Tokens/s of sampling `decode_prompts` x `generations` completions of `decode_tokens` each."""
    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..rollout import decode_completions

    phases = Phases(device)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, case.config["vocab_size"], (case.decode_prompts, case.prompt_len), generator=gen)
    never = torch.tensor([-1], device=device)  # an EOS id no sample matches: full-length completions
    run = phases.wrap("rollout", lambda: decode_completions(model, prompts.to(device), torch.ones_like(prompts).to(device),
                                                 case.generations, case.decode_tokens, 1.0, 1.0, True, never, 0))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = run()
    tokens = out.numel()
    seconds = phases.seconds["rollout"][0]
    return {"rows": out.shape[0], "new_tokens": out.shape[1], "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_bytes": (phases.peak_bytes["rollout"] or [None])[0]}


def method_config(method: str, case: Case, device: torch.device):
    """The paper recipe's precision and optimizer settings, sized to the case (no Hydra needed)."""
    from omegaconf import OmegaConf

    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..config import TrainConfig, config_dir, validate

    preset = OmegaConf.load(config_dir() / "method" / f"{method}.yaml")
    paper = OmegaConf.load(config_dir() / "paper" / "qwen3-4b-oisd.yaml")
    sizes = {"grpo": {"prompts_per_step": case.rows // case.generations, "num_generations": case.generations,
                      "micro_batch_size": case.micro, "max_completion_length": case.completion_len, "lr": LR,
                      "optimizer": paper.grpo.get("optimizer", "adamw")},
             "model": {"dtype": paper.model.dtype, "gradient_checkpointing": True},
             "log": {"every_n_steps": 1, "snapshot_rollouts": 2, "wandb_mode": "disabled", "progress_bar": False},
             "method": {"chunk_size": 4096}, "precision": paper.precision, "max_steps": STEPS + 1,
             "accelerator": "gpu" if device.type == "cuda" else "cpu"}
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), {"method": preset}, sizes))
    validate(cfg)
    return cfg


class _IdTokenizer:
    """What the logging hook's snapshot asks of a tokenizer, for a model that has none: ids as text."""

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def run_method(model, case: Case, method: str, device: torch.device, rollout, workdir: Path) -> dict:
    """Warm-up + `STEPS` Lightning steps of `method` on the fixed rollout: phases, losses, weights changed."""
    import lightning as L
    from torch.utils.data import DataLoader

    # on use: a section loads training code only when it runs, so importing the bench package stays light
    from ..module import OISDModule
    from ..run.folder import RunDir
    from ..run_hooks import LogStepHook
    from ..sampler import Sampler

    cfg = method_config(method, case, device)
    G = case.generations
    problems = [SimpleNamespace(prompt="", answer="right")] * (case.rows // G)
    run = RunDir(workdir / method)  # where the logging hook writes diagnostics, completions, snapshots
    run.root.mkdir(parents=True, exist_ok=True)
    tokenizer = _IdTokenizer()
    sampler = Sampler(cfg, model, tokenizer, reward=lambda text, answer: float(text == answer),
                      draw=lambda step, rank, world: (problems, rollout))
    module = OISDModule(cfg, model, tokenizer, sampler, on_log_step=LogStepHook(cfg, run))
    phases = Phases(device)
    module.phases.subscribe(phases.observer({"rollout": "rollout", "diagnostics": "diagnostics",
                                             "policy step": "forward_backward"}))
    rows = []
    before = [p.detach().to("cpu", copy=True) for p in model.parameters()]
    trainer = L.Trainer(max_steps=STEPS + 1, max_epochs=-1, accelerator=cfg.accelerator, devices=1,
                        precision=cfg.precision, logger=[_Rows(rows)], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(workdir))
    trainer.fit(module, train_dataloaders=DataLoader(list(range(STEPS + 1)), batch_size=None))
    changed = sum(int((p.detach().cpu() != b).sum()) for p, b in zip(model.parameters(), before, strict=True))
    total = sum(b.numel() for b in before)
    out = {"phases": phases.summary(), "weights_changed_fraction": changed / total, "lr": LR,
           "precision": cfg.precision, "optimizer": cfg.grpo.optimizer, "student_layers": module.student_layers,
           "losses": {k: v for k, v in rows[-1].items() if k.startswith(("loss/", "grad_norm"))} if rows else {}}
    del before, trainer, module
    return out


def _Rows(rows: list):
    """A Lightning logger that appends every metrics row to `rows`."""
    from lightning.pytorch.loggers import Logger

    class _Log(Logger):
        name, version = "gpu_check", "0"

        def log_hyperparams(self, *args, **kwargs):
            return None

        def log_metrics(self, metrics, step=None):
            rows.append(dict(metrics))

    return _Log()


def ratios(grpo: dict, oisd: dict) -> dict:
    """OISD / GRPO of the optimisation step's time and peak memory, and the alignment's added seconds."""
    g, o = grpo["phases"]["forward_backward"], oisd["phases"]["forward_backward"]
    out = {"forward_backward_time": o["seconds"] / g["seconds"], "alignment_seconds": o["seconds"] - g["seconds"]}
    if g["peak_bytes"]:
        out["forward_backward_peak"] = o["peak_bytes"] / g["peak_bytes"]
    return out


def check_case(case: Case, device: torch.device, workdir: Path, log=print) -> dict:
    """Decoding, then `grpo` and `oisd` steps, on one model."""
    model = build_model(case, device)
    params = sum(p.numel() for p in model.parameters())
    log(f"[gpu-check] {case.name}: {case.layers} layers, {params / 1e9:.2f}B parameters")
    out = {"case": asdict(case), "parameters": params, "decode": time_decoding(model, case, device)}
    log(f"[gpu-check] {case.name} decoding: {out['decode']['tokens_per_s']:.0f} tokens/s")
    rollout = synthetic_rollout(case)
    out["methods"] = {}
    for method in ("grpo", "oisd"):
        out["methods"][method] = run_method(model, case, method, device, rollout, workdir)
        gc.collect()  # the Trainer and module hold the optimizer state in reference cycles
        if device.type == "cuda":
            torch.cuda.empty_cache()
        step = out["methods"][method]["phases"]["forward_backward"]["seconds"]
        log(f"[gpu-check] {case.name} {method}: optimisation step {step:.2f} s, "
            f"weights changed {out['methods'][method]['weights_changed_fraction']:.3f}")
    out["ratios"] = ratios(out["methods"]["grpo"], out["methods"]["oisd"])
    del model
    return out


SHARDED_TINY = ["debug=quick", "method=oisd", "strategy=fsdp", "max_steps=3", "checkpoint_every=3", "task.num_test=4",
                "eval.k=1", "grpo.max_completion_length=16", "num_threads=1", "log.wandb_mode=disabled"]
RECIPE_SIZE = ["max_steps=2", "checkpoint_every=2", "grpo.prompts_per_step=2", "grpo.num_generations=4",
               "grpo.micro_batch_size=4", "task.num_test=2", "eval.k=1", "eval.batch_size=2", "num_threads=1"]


def recipe_shape(cpu: bool):
    """Qwen3-4B's width, heads and vocabulary at 8 layers (the recipe's student, layer 6, is among
    them); on CPU the recipe's vocabulary at width 64, 8 layers."""
    # on use: the recipe module writes models and tokenizers only when the sharded part runs
    from .recipe import CPU_SHAPE, Shape

    if cpu:
        return replace(CPU_SHAPE, num_layers=8)
    c = QWEN3_4B
    return Shape(c["hidden_size"], 8, c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
                 c["intermediate_size"], c["vocab_size"])


def check_sharded(device: torch.device, workdir: Path, left, small: bool = False, log=print) -> dict:
    """The `tiny` and `recipe` sharded runs (module docstring) on every visible GPU, or 2 CPU ranks;
    `small`: the recipe at the CPU shape on GPUs too (`--tiny`)."""
    # on use: the recipe module writes models and tokenizers only when the sharded part runs
    from .recipe import metrics_summary, recipe_run, train_run

    cpu = device.type == "cpu"
    ranks = 2 if cpu else torch.cuda.device_count()
    where = ["accelerator=cpu" if cpu else "accelerator=gpu", f"devices={ranks}"]
    out = {"ranks": ranks, "backend": "gloo" if cpu else "nccl"}
    if left() < 60:
        return {**out, "tiny": "skipped: time budget", "recipe": "skipped: time budget"}
    run = workdir / "sharded_tiny"
    tiny = [*SHARDED_TINY, *where, *([] if cpu else ["precision=bf16-mixed"]), f"run_dir={run}"]
    res = {**train_run(tiny, " ".join(tiny[:-1]), workdir, "sharded_tiny", timeout=max(left() - 30, 30)),
           **metrics_summary(run)}
    if (run / "final_model").is_dir():
        # on use: transformers loads only when a final model was exported
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(run / "final_model")
        res["final_model_parameters"] = sum(p.numel() for p in loaded.parameters())
    out["tiny"] = res
    log(f"[gpu-check] sharded tiny on {ranks} rank(s): exit {res['exit_status']}, {res['wall_seconds']:.0f} s, "
        f"grad_norm {res.get('grad_norm')}")
    if left() < 90:
        out["recipe"] = "skipped: time budget"
        return out
    size = [*RECIPE_SIZE, *where, f"grpo.max_completion_length={8 if cpu else 256}",
            f"eval.max_new_tokens={8 if cpu else 64}"]
    recipe = recipe_run(workdir / "recipe", recipe_shape(cpu or small), size, ranks, timeout=max(left() - 30, 30))
    recipe.pop("plan", None)  # the per-rank comparison below keeps the plan's figures that matter here
    recipe.pop("eval", None)
    out["recipe"] = recipe
    ratios = {r: round(v["ratio"], 3) for r, v in recipe["planned_vs_measured"].items()}
    log(f"[gpu-check] sharded paper recipe on {ranks} rank(s): exit {recipe['exit_status']}, "
        f"{recipe['wall_seconds']:.0f} s, measured/planned peak {ratios}")
    return out


def run_gpu_tests(timeout: int = 300) -> dict:
    """`pytest -m gpu` on the test suite: exit code and its closing line."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    try:
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[2:]), "rc": None, "summary": f"timed out after {timeout} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    return {"command": " ".join(cmd[2:]), "rc": done.returncode, "summary": lines[-1] if lines else "",
            "tail": "\n".join(lines[-30:])}


def machine(device: torch.device) -> dict:
    import lightning
    import transformers

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "device": str(device), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu/run.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the tiny Qwen3 on CPU, in seconds (the test suite's run)")
    parser.add_argument("--tiny", action="store_true", help="the tiny Qwen3 on the GPU (a quick look at the device path)")
    parser.add_argument("--models", default=",".join(c.name for c in GPU_CASES), help="comma list of GPU cases")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/gpu_check.json, or gpu_check_cpu.json)")
    parser.add_argument("--no-pytest", action="store_true", help="skip `pytest -m gpu`")
    parser.add_argument("--no-sharded", action="store_true", help="skip the sharded runs (strategy=fsdp)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds: a part that would start later is skipped and marked so (default 450)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device visible; use --cpu for the CPU mode")
    device = torch.device("cpu" if args.cpu else "cuda")
    cases = CPU_CASES if args.cpu or args.tiny else [c for c in GPU_CASES if c.name in args.models.split(",")]
    out = args.out or Path(__file__).resolve().parents[2] / "benchmarks" / "results" / (
        "gpu_check_cpu.json" if args.cpu else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"mode": "cpu" if args.cpu else "gpu", "machine": machine(device), "models": {}, "sharded": None,
              "pytest_gpu": None}

    def save() -> None:  # after every part: a run cut short by a time limit keeps what it measured
        result["total_seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(result, indent=2))

    def left() -> float:
        return args.budget - (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            result["models"][case.name] = check_case(case, device, Path(tmp)) if left() > 0 else "skipped: time budget"
            save()
            if i == 0 and not args.no_sharded:  # before the larger models: the sharded path is checked first
                result["sharded"] = check_sharded(device, Path(tmp), left, small=args.tiny)
                save()
    if not (args.no_pytest or args.cpu):
        result["pytest_gpu"] = run_gpu_tests(int(left())) if left() > 30 else "skipped: time budget"
    save()
    print(f"[gpu-check] {result['total_seconds']:.0f} s; results in {out}")
    return result


if __name__ == "__main__":
    main()
