"""`oisd-lab bench`: step time, loss memory and the TRL comparison, measured side by side.

Every time is taken on two clocks: wall seconds and the process's CPU seconds (`time.process_time`).
With one torch thread (the default here) CPU seconds equal wall seconds on an idle machine, and
on a shared one they leave out the time the process waits for a core, which is most of the noise.

Sections (`--sections`, default all):

- `presets`: every method preset on the same policy. Per round and preset: the weights are reset,
  then `--steps` + 1 Lightning steps on ONE fixed rollout batch (the optimisation step alone:
  scoring, forward/backward, optimizer) and `--steps` + 1 full steps (generation included, same
  seeds, so the first rollout is identical across presets; the per-layer diagnostics hook on,
  as in `oisd-lab train`). The first step of every fit is a warm-up and is dropped (it is also
  the diagnostics step, timed on its own). Presets run round-robin, the starting preset rotating
  per round, so that load changes on a shared machine hit every preset alike; ratios to `grpo`
  are paired per round. Phases come from wrapping the module's `_rollout` and `_optimise`.
- `memory`: peak memory of one loss forward+backward (`OISDModule._loss_terms` + backward, one
  micro-batch) at a large vocabulary, per preset, from the CPU allocator's own accounting as
  recorded by `torch.profiler` (profile_memory=True: every allocation and free made inside the
  region; the weights and inputs, allocated before, are not counted), cross-checked by sampling
  the process's resident set size every millisecond.
- `attn512`: `grpo` against `oisd_attn` (and `oisd`) at long completions, on a fixed rollout
  batch, plus the time of generating that batch (EOS suppressed), so the added cost is given
  against the optimisation step and against the full step.
- `trl`: the same GRPO work through TRL's `GRPOTrainer` (same tiny model, prompts, reward,
  num_generations, lengths, batch, micro-batch, loss_type dapo, beta 0, fp32, no gradient
  checkpointing, no vLLM) and through `oisd-lab`'s Lightning loop, alternating in one process.
  Step time runs from one optimizer-step end to the next (everything a step costs: data,
  generation, scoring, loss, update, logging), first step dropped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PRESETS = ("grpo", "oisd_logit", "oisd_attn", "oisd", "oisd_unsigned")
SECTIONS = ("presets", "memory", "attn512", "trl")


@dataclass
class Settings:
    """Sizes of every section; `--quick` shrinks them to a smoke test."""

    prompts: int = 16
    generations: int = 8
    max_len: int = 32
    micro: int = 64
    repeats: int = 5
    steps: int = 3
    threads: int = 1
    seed: int = 0
    init: str = "random"
    mem_vocab: int = 151_936
    mem_tokens: int = 4096
    mem_completion: int = 256
    attn_len: int = 512
    attn_prompts: int = 4
    attn_micro: int = 32
    trl_steps: int = 4
    presets: tuple[str, ...] = PRESETS
    sections: tuple[str, ...] = SECTIONS


QUICK = dict(prompts=2, generations=2, max_len=6, micro=4, repeats=1, steps=1, mem_vocab=2048,
             mem_tokens=64, mem_completion=16, attn_len=24, attn_prompts=1, attn_micro=2, trl_steps=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--init", default=None,
                        help="policy of the presets and trl sections: random (default), warm (the cached "
                             "warm start, built if missing) or a checkpoint directory")
    parser.add_argument("--presets", default=",".join(PRESETS), help="method presets to time")
    parser.add_argument("--repeats", type=int, help="rounds per section (round-robin over presets)")
    parser.add_argument("--steps", type=int, help="timed steps per fit (one warm-up step more)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--prompts", type=int, help="prompts per step")
    parser.add_argument("--max-len", dest="max_len", type=int, help="max_completion_length")
    parser.add_argument("--trl-steps", dest="trl_steps", type=int, help="timed steps per TRL/ours fit")
    parser.add_argument("--mem-vocab", dest="mem_vocab", type=int, help="vocabulary of the memory section")
    parser.add_argument("--mem-tokens", dest="mem_tokens", type=int, help="completion tokens of the memory section")
    parser.add_argument("--attn-len", dest="attn_len", type=int, help="completion length of attn512")


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(**(QUICK if args.quick else {}))
    for name in ("repeats", "steps", "threads", "prompts", "max_len", "trl_steps", "mem_vocab", "mem_tokens",
                 "attn_len", "init"):
        if getattr(args, name, None) is not None:
            setattr(s, name, getattr(args, name))
    s.sections = tuple(x for x in args.sections.split(",") if x)
    s.presets = tuple(x for x in args.presets.split(",") if x)
    unknown = [x for x in s.sections if x not in SECTIONS] + [x for x in s.presets if x not in PRESETS]
    if unknown:
        raise SystemExit(f"error: bench: unknown section or preset {unknown}")
    if "grpo" not in s.presets:
        s.presets = ("grpo", *s.presets)  # every ratio is over grpo
    return s


def run(args: argparse.Namespace) -> int:
    s = settings_from(args)
    _quiet()
    torch.set_num_threads(s.threads)
    result = {"meta": machine_info(s, quick=args.quick)}
    for name in s.sections:
        load = os.getloadavg()
        start = time.perf_counter()
        result[name] = SECTION_FUNCS[name](s)
        result[name]["load_avg"] = {"start": load, "end": os.getloadavg()}
        result[name]["seconds"] = time.perf_counter() - start
        print(f"[bench] {name} done in {result[name]['seconds']:.0f} s", flush=True)
    result["targets"] = targets(result)
    print(format_tables(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------- shared pieces


def stats(values: list[float]) -> dict:
    """Median and spread of repeated measurements."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": vals}


def machine_info(s: Settings, quick: bool = False) -> dict:
    import lightning
    import transformers

    cpu = "unknown"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "nproc": os.cpu_count(), "cpu": cpu,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "trl": trl_version, "quick": quick,
            "load_avg": os.getloadavg(), "settings": asdict(s)}


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "disabled")
    warnings.filterwarnings("ignore")
    import logging

    from transformers.utils import logging as hf_logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "transformers", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()


def _cfg(s: Settings, method: str, **extra):
    from .config import compose

    over = [f"method={method}", f"seed={s.seed}", "max_steps=1000000", "log.progress_bar=false",
            f"grpo.prompts_per_step={extra.pop('prompts', s.prompts)}",
            f"grpo.num_generations={s.generations}",
            f"grpo.max_completion_length={extra.pop('max_len', s.max_len)}",
            f"grpo.micro_batch_size={extra.pop('micro', s.micro)}"]
    return compose(over + [f"{k}={v}" for k, v in extra.items()])


def _start_policy(s: Settings):
    """(policy, tokenizer) of the presets and TRL sections: `--init` random, warm or a checkpoint."""
    from .models import build_char_tokenizer, load_pretrained

    if s.init == "random":
        tok = build_char_tokenizer()
        return _policy(len(tok), s.seed), tok
    path = s.init
    if s.init == "warm":
        from .pretrain import warm_start

        path = warm_start(_cfg(s, "grpo"), log=lambda *a: None)
    return load_pretrained(path)


def _policy(vocab_size: int, seed: int = 0, max_positions: int = 512):
    from .models import build_tiny_model

    return build_tiny_model("tiny", vocab_size=vocab_size, seed=seed, max_positions=max_positions)


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class _Clock:
    """Lightning callback and logger in one: per step, wall and process CPU seconds, the phases
    recorded by `_lap`, and the module's own metric row."""

    def __init__(self) -> None:
        from lightning.pytorch.callbacks import Callback
        from lightning.pytorch.loggers import Logger

        clock = self
        self.marks: list[tuple[float, float]] = []
        self.phases: list[dict] = []
        self.current: dict = {}
        self.rows: list[dict] = []

        class _Cb(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if not clock.marks:
                    clock.marks.append(_now())

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                clock.marks.append(_now())
                clock.phases.append(clock.current)
                clock.current = {}

        class _Log(Logger):
            name, version = "bench", "0"

            def log_hyperparams(self, params, *a, **k):
                return None

            def log_metrics(self, metrics, step=None):
                clock.rows.append(dict(metrics))

        self.callback, self.logger = _Cb(), _Log()

    def lap(self, fn, key: str):
        """`fn` wrapped so that its wall and CPU seconds add to this step's `key`."""

        def wrapper(*args, **kwargs):
            w0, c0 = _now()
            try:
                return fn(*args, **kwargs)
            finally:
                w1, c1 = _now()
                self.current[f"{key}_wall"] = self.current.get(f"{key}_wall", 0.0) + w1 - w0
                self.current[f"{key}_cpu"] = self.current.get(f"{key}_cpu", 0.0) + c1 - c0

        return wrapper

    def steps(self) -> list[dict]:
        out = []
        for (w0, c0), (w1, c1), phases, row in zip(self.marks, self.marks[1:], self.phases, self.rows, strict=False):
            out.append({**row, **phases, "wall": w1 - w0, "cpu": c1 - c0})
        return out


def _fit(module, steps: int) -> list[dict]:
    """`steps` Lightning training steps; per step the module's metrics, `wall` and `cpu` seconds
    (from the start of one step to the end of the next, so Lightning and logging count), and
    `rollout_*`, `optimise_*`, `diagnostics_*` phase times."""
    import lightning as L
    from torch.utils.data import DataLoader

    clock = _Clock()
    module._rollout = clock.lap(module._rollout, "rollout")
    module._optimise = clock.lap(module._optimise, "optimise")
    if module.on_log_step is not None:
        module.on_log_step = clock.lap(module.on_log_step, "diagnostics")
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=[clock.logger],
                        callbacks=[clock.callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
                        max_epochs=-1, default_root_dir=tempfile.gettempdir())
    trainer.fit(module, train_dataloaders=DataLoader(list(range(steps)), batch_size=None))
    return clock.steps()


def _module(cfg, policy, tokenizer, source, fixed=None, hook=None):
    from .module import OISDModule

    module = OISDModule(cfg, policy, tokenizer, source, source.reward, on_log_step=hook)
    if fixed is not None:  # one rollout batch for every step: the optimisation step alone
        module._rollout = lambda step, rank, world: fixed
    return module


def _rotated(items: tuple[str, ...], r: int) -> list[str]:
    k = r % len(items)
    return list(items[k:] + items[:k])


def _median_of(rows: list[dict], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


# ---------------------------------------------------------------- presets


def bench_presets(s: Settings) -> dict:
    from .rollout import generate
    from .run_hooks import LogStepHook
    from .sources import load_source
    from .train import RunDir

    policy, tok = _start_policy(s)
    init = copy.deepcopy(policy.state_dict())
    cfgs = {m: _cfg(s, m) for m in s.presets}
    source = load_source(cfgs["grpo"].task)
    problems = source.train_batch(0, s.prompts, s.seed)
    torch.manual_seed(s.seed)
    fixed = (problems, generate(policy, tok, [p.prompt for p in problems], s.generations, s.max_len))
    opt: dict[str, list[list[dict]]] = {m: [] for m in s.presets}
    full: dict[str, list[list[dict]]] = {m: [] for m in s.presets}
    _fit(_module(cfgs["grpo"], policy, tok, source, fixed), 2)  # process warm-up
    with tempfile.TemporaryDirectory(prefix="oisd_bench_") as tmp:  # diagnostics files
        for r in range(s.repeats):
            for m in _rotated(s.presets, r):
                policy.load_state_dict(init)
                opt[m].append(_fit(_module(cfgs[m], policy, tok, source, fixed), s.steps + 1))
                policy.load_state_dict(init)
                run_dir = Path(tmp) / f"{m}-{r}"
                run_dir.mkdir()
                hook = LogStepHook(cfgs[m], RunDir(run_dir))
                full[m].append(_fit(_module(cfgs[m], policy, tok, source, hook=hook), s.steps + 1))
    policy.load_state_dict(init)
    return {"batch": {"prompts": s.prompts, "generations": s.generations, "max_completion_length": s.max_len,
                      "micro_batch_size": s.micro, "fixed_rollout_completion_tokens":
                      float(fixed[1].completion_mask.sum())},
            "log_every_n_steps": cfgs["grpo"].log.every_n_steps,
            "per_preset": {m: _preset_summary(m, opt, full, s, cfgs[m].log.every_n_steps) for m in s.presets}}


def _per_round(fits_a: list, fits_b: list, fn) -> dict:
    return stats([fn(a, b) for a, b in zip(fits_a, fits_b, strict=True)])


def _ratio(key: str):
    return lambda a, b: _median_of(a, key) / _median_of(b, key)


def _preset_summary(m: str, opt: dict, full: dict, s: Settings, every: int) -> dict:
    timed = lambda fits: [f[1:] for f in fits]  # noqa: E731  drop each fit's warm-up step
    o, g = timed(opt[m]), timed(opt["grpo"])
    f, fg = timed(full[m]), timed(full["grpo"])
    batch = s.prompts * s.generations
    out: dict = {"mean_completion_length": stats([_median_of(x, "completions/mean_length") for x in f])}
    for c in ("cpu", "wall"):
        diag = stats([x[0][f"diagnostics_{c}"] for x in full[m] if f"diagnostics_{c}" in x[0]])
        align = _per_round(o, g, lambda a, b, c=c: _median_of(a, f"optimise_{c}") - _median_of(b, f"optimise_{c}"))
        rest = lambda x, c=c: (_median_of(x, c) - _median_of(x, f"rollout_{c}")  # noqa: E731
                               - _median_of(x, f"optimise_{c}") - _median_of(x, "time/scoring"))
        out[c] = {
            "opt_step_s": stats([_median_of(x, c) for x in o]),
            "full_step_s": stats([_median_of(x, c) for x in f]),
            "ratio_opt_vs_grpo": _per_round(o, g, _ratio(c)),
            "ratio_full_vs_grpo": _per_round(f, fg, _ratio(c)),
            "rollout_tokens_per_s": stats([statistics.median(r["completions/mean_length"] * batch / r[f"rollout_{c}"]
                                                             for r in x) for x in f]),
            "diagnostics_per_log_step_s": diag,
            "breakdown_s": {
                "rollout": stats([_median_of(x, f"rollout_{c}") for x in f]),
                "scoring": stats([_median_of(x, "time/scoring") for x in f]),
                "forward_backward": stats([_median_of(x, f"optimise_{c}") for x in f]),
                "alignment": align,
                "logging": stats([rest(x) + (diag["median"] or 0.0) / every for x in f]),
                "step": stats([_median_of(x, c) for x in f]),
            },
        }
    return out


# ---------------------------------------------------------------- memory


def _synthetic_rollout(tokenizer, batch: int, prompt_len: int, completion_len: int, seed: int = 0):
    """A rollout of random printable tokens, every completion exactly `completion_len` long."""
    from .rollout import Rollout

    gen = torch.Generator().manual_seed(seed)
    low = 3  # after pad, bos, eos: never ends a completion early
    ids = torch.randint(low, len(tokenizer), (batch, prompt_len + completion_len), generator=gen)
    texts = ["x" * completion_len] * batch
    return Rollout(input_ids=ids, attention_mask=torch.ones_like(ids),
                   completion_mask=torch.ones(batch, completion_len), prompt_length=prompt_len,
                   texts=texts, truncated=torch.ones(batch, dtype=torch.bool))


class _RssPeak:
    """Peak resident set size above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def bytes(self) -> int:
        return self.peak - self.base


def profiler_peak(fn) -> int:
    """Peak bytes held by tensors allocated inside `fn()` (CPU allocator events of torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        cur += event.nbytes()
        peak = max(peak, cur)
    return peak


def bench_memory(s: Settings) -> dict:
    from .models import build_char_tokenizer
    from .sources import load_source

    tok = build_char_tokenizer()
    completion = min(s.mem_completion, s.mem_tokens)
    batch = max(s.mem_tokens // completion, 1)
    prompt_len = 16
    policy = _policy(s.mem_vocab, s.seed, max_positions=prompt_len + completion + 1)
    rollout = _synthetic_rollout(_VocabOnly(s.mem_vocab), batch, prompt_len, completion, s.seed)
    adv = torch.linspace(-1.5, 1.5, batch)
    norm = dict(num_items_in_batch=rollout.completion_mask.sum(), num_sequences=batch,
                max_completion_length=completion)
    out = {"vocab_size": s.mem_vocab, "completion_tokens": batch * completion, "batch": batch,
           "completion_length": completion, "prompt_length": prompt_len,
           "logits_bytes": batch * completion * s.mem_vocab * 4, "per_preset": {}}
    presets = [m for m in ("grpo", "oisd_logit", "oisd_attn", "oisd") if m in s.presets or m == "grpo"]
    for m in presets:
        cfg = _cfg(s, m, prompts=max(batch // s.generations, 1), max_len=completion, micro=batch)
        module = _module(cfg, policy, tok, load_source(cfg.task))

        def step(module=module):
            policy.zero_grad(set_to_none=True)
            terms = module._loss_terms(rollout, adv, norm)
            terms["loss/total"].backward()
            del terms

        peak = profiler_peak(step)
        policy.zero_grad(set_to_none=True)
        with _RssPeak() as rss:
            step()
        policy.zero_grad(set_to_none=True)
        out["per_preset"][m] = {"peak_bytes": peak, "rss_peak_bytes": rss.bytes}
        print(f"[bench] memory {m}: {peak / 2**20:.0f} MiB (RSS {rss.bytes / 2**20:.0f} MiB)", flush=True)
    base = out["per_preset"]["grpo"]
    for v in out["per_preset"].values():
        v["ratio_vs_grpo"] = v["peak_bytes"] / base["peak_bytes"]
        v["rss_ratio_vs_grpo"] = v["rss_peak_bytes"] / max(base["rss_peak_bytes"], 1)
    return out


class _VocabOnly:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


# ---------------------------------------------------------------- attention at long completions


def bench_attn(s: Settings) -> dict:
    from .models import build_char_tokenizer
    from .rollout import generate
    from .sources import load_source

    tok = build_char_tokenizer()
    policy = _policy(len(tok), s.seed, max_positions=s.attn_len + 64)
    init = copy.deepcopy(policy.state_dict())
    presets = [m for m in ("grpo", "oisd_attn", "oisd") if m in s.presets]
    cfgs = {m: _cfg(s, m, prompts=s.attn_prompts, max_len=s.attn_len, micro=s.attn_micro) for m in presets}
    source = load_source(cfgs["grpo"].task)
    problems = source.train_batch(0, s.attn_prompts, s.seed)
    batch = s.attn_prompts * s.generations
    rollout = _synthetic_rollout(tok, batch, 16, s.attn_len, s.seed)
    fixed = (problems, rollout)
    fits: dict[str, list[list[dict]]] = {m: [] for m in presets}
    gen_s = []
    for r in range(s.repeats):
        torch.manual_seed(s.seed + r)
        w0, c0 = _now()
        generate(policy, _NoEos(tok), [p.prompt for p in problems], s.generations, s.attn_len)
        w1, c1 = _now()
        gen_s.append({"wall": w1 - w0, "cpu": c1 - c0})
        for m in _rotated(tuple(presets), r):
            policy.load_state_dict(init)
            fits[m].append(_fit(_module(cfgs[m], policy, tok, source, fixed), s.steps + 1)[1:])
    policy.load_state_dict(init)
    out = {"completion_length": s.attn_len, "batch": batch, "micro_batch_size": s.attn_micro,
           "generate_s": {c: stats([x[c] for x in gen_s]) for c in ("cpu", "wall")}, "per_preset": {}}
    for m in presets:
        out["per_preset"][m] = {}
        for c in ("cpu", "wall"):
            gen = out["generate_s"][c]["median"]
            out["per_preset"][m][c] = {
                "opt_step_s": stats([_median_of(a, c) for a in fits[m]]),
                "ratio_opt_vs_grpo": _per_round(fits[m], fits["grpo"], _ratio(c)),
                "ratio_full_vs_grpo": _per_round(fits[m], fits["grpo"], lambda a, b, c=c, gen=gen:
                                                 (gen + _median_of(a, c)) / (gen + _median_of(b, c))),
            }
    return out


class _NoEos:
    """A tokenizer view whose EOS id is never sampled, so every completion runs to full length."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.eos_token_id = len(tokenizer) + 1_000_000

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)


# ---------------------------------------------------------------- TRL


def bench_trl(s: Settings) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not installed (pip install -e '.[bench]')"}
    from .sources import load_source

    policy, tok = _start_policy(s)
    cfg = _cfg(s, "grpo")
    source = load_source(cfg.task)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="oisd_bench_trl_") as tmp:
        model_dir = Path(tmp) / "model"  # both trainers start from these weights every round
        policy.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        for r in range(s.repeats):
            order = [_ours_fit, _trl_fit] if r % 2 == 0 else [_trl_fit, _ours_fit]
            for fn in order:
                rows = fn(s, cfg, source, model_dir, r)
                (ours if fn is _ours_fit else theirs).append(rows[1:])
    out = {"batch": {"prompts": s.prompts, "generations": s.generations, "max_completion_length": s.max_len,
                     "micro_batch_size": s.micro, "loss_type": "dapo", "beta": 0.0},
           "ours_mean_completion_length": stats([_median_of(x, "completions/mean_length") for x in ours]),
           "trl_mean_completion_length": stats([_median_of(x, "completions/mean_length") for x in theirs])}
    for c in ("cpu", "wall"):
        out[c] = {"ours_step_s": stats([_median_of(x, c) for x in ours]),
                  "trl_step_s": stats([_median_of(x, c) for x in theirs]),
                  "ratio_ours_vs_trl": _per_round(ours, theirs, _ratio(c)),
                  "ours_rollout_s": stats([_median_of(x, f"rollout_{c}") for x in ours]),
                  "trl_generate_s": stats([_median_of(x, f"generate_{c}") for x in theirs])}
    return out


def _ours_fit(s: Settings, cfg, source, model_dir: Path, r: int) -> list[dict]:
    from .models import load_pretrained

    policy, tok = load_pretrained(model_dir)
    cfg = copy.deepcopy(cfg)
    cfg.seed = s.seed + r
    return _fit(_module(cfg, policy, tok, source), s.trl_steps + 1)


def _trl_fit(s: Settings, cfg, source, model_dir: Path, r: int) -> list[dict]:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from .models import load_pretrained

    steps = s.trl_steps + 1
    problems = [p for k in range(steps) for p in source.train_batch(k, s.prompts, s.seed + r)]
    data = Dataset.from_dict({"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]})

    def correct(prompts, completions, answer, **kwargs):
        return [source.reward(c, a) for c, a in zip(completions, answer, strict=True)]

    rows: list[dict] = []
    marks: list[tuple[float, float]] = []

    class Rec(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not marks:
                marks.append(_now())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(_now())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                rows.append({"completions/mean_length": float(logs["completions/mean_length"])})

    batch = s.prompts * s.generations
    accum = max(batch // s.micro, 1)
    args = GRPOConfig(
        output_dir=str(model_dir.parent / f"trl-{r}"), num_generations=s.generations,
        max_completion_length=s.max_len, per_device_train_batch_size=min(s.micro, batch),
        gradient_accumulation_steps=accum, loss_type="dapo", beta=0.0, learning_rate=cfg.grpo.lr,
        max_grad_norm=cfg.grpo.max_grad_norm, temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p,
        top_k=0, epsilon=cfg.grpo.epsilon_low, epsilon_high=cfg.grpo.epsilon_high,
        scale_rewards="group", report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, use_vllm=False, max_steps=steps, logging_steps=1,
        save_strategy="no", shuffle_dataset=False, disable_tqdm=True, seed=s.seed + r,
        dataloader_num_workers=0, lr_scheduler_type="constant", weight_decay=cfg.grpo.weight_decay)
    policy, tok = load_pretrained(model_dir)
    gen_times: list[tuple[float, float]] = []
    policy.generate = _timed(policy.generate, gen_times)
    trainer = GRPOTrainer(model=policy, reward_funcs=correct, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Rec()])
    trainer.remove_callback(PrinterCallback)  # no per-step log lines in the bench output
    trainer.train()
    out = []
    for (w0, c0), (w1, c1), row, (gw, gc) in zip(marks, marks[1:], rows, gen_times, strict=False):
        out.append({**row, "wall": w1 - w0, "cpu": c1 - c0, "generate_wall": gw, "generate_cpu": gc})
    return out


def _timed(fn, sink: list[tuple[float, float]]):
    def wrapper(*args, **kwargs):
        w0, c0 = _now()
        try:
            return fn(*args, **kwargs)
        finally:
            w1, c1 = _now()
            sink.append((w1 - w0, c1 - c0))

    return wrapper


# ---------------------------------------------------------------- targets and tables


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
    return out


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


SECTION_FUNCS = {"presets": bench_presets, "memory": bench_memory, "attn512": bench_attn, "trl": bench_trl}
