"""vLLM rollout backend (`grpo.rollout_backend=vllm`, extra `pip install -e .[vllm]`, CUDA only).

A colocated vLLM engine in the training process samples the G completions of every prompt and the
result is the same `Rollout` that `rollout.generate` builds, so the loss path cannot tell the two
apart. vLLM keeps its own copy of the weights: before sampling, the backend copies the policy's
current parameters into the engine's model (`load_weights` on the model runner's model) whenever an
optimizer update happened since the last copy, so every rollout is sampled from the current policy.

Choices (as TRL's colocate mode): the engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`)
so its model object is reachable for `load_weights`; one engine per rank, each on its own GPU
(vLLM's `external_launcher` under DDP);
`gpu_memory_utilization` bounds the engine's share of the GPU (the rest is the trainer's). Sampling
is plain ancestral sampling at `temperature` with optional top-p, as in `rollout.generate`, so the
log-probabilities recomputed for the loss are those of the sampling distribution. vLLM's own
log-probs of the sampled tokens (after temperature, `processed_logprobs` as TRL) come back as
`Rollout.sampler_logps`, for the sampler/trainer importance-sampling correction. vLLM is imported
lazily: nothing here needs it until an engine is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

from .rollout import Rollout


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


def _engine_model(llm):
    """The torch model inside a colocated vLLM engine (its location moved between vLLM versions)."""
    paths = (
        ("llm_engine", "model_executor", "driver_worker", "model_runner", "model"),
        ("llm_engine", "model_executor", "driver_worker", "worker", "model_runner", "model"),
        ("llm_engine", "engine_core", "engine_core", "model_executor", "driver_worker", "worker",
         "model_runner", "model"),
    )
    for path in paths:
        obj = llm
        try:
            for name in path:
                obj = getattr(obj, name)
        except AttributeError:
            continue
        if hasattr(obj, "load_weights"):
            return obj
    return None


class VLLMRollout:
    """Samples rollouts with a colocated vLLM engine that follows the policy's weights."""

    def __init__(self, model_path: str, tokenizer, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, seed: int = 0, device: torch.device | str = "cuda"):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as err:
            raise RuntimeError("grpo.rollout_backend=vllm needs vLLM: pip install -e '.[vllm]'") from err
        self.tokenizer = tokenizer
        self.device = device
        self.llm = LLM(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       enable_prefix_caching=True, logprobs_mode="processed_logprobs", **_launcher_kwargs())
        self.synced_version: int | None = None

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy (name, tensor) pairs of the policy into the engine; `version` names the update."""
        weights = ((name, tensor.detach()) for name, tensor in named_tensors)
        model = _engine_model(self.llm)
        if model is not None:
            model.load_weights(weights)
        else:  # engines whose model lives behind an RPC boundary
            items = list(weights)
            self.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(items))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        self.synced_version = version

    def generate(self, prompts: Sequence[str], num_generations: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> Rollout:
        """G sampled completions per prompt, as a group-contiguous `Rollout` on `self.device`."""
        from vllm import SamplingParams

        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        eos = self.tokenizer.eos_token_id
        # stop on the tokenizer's EOS only, as `rollout.generate` does (not on every EOS id of the
        # model's generation config), with top-k off
        params = SamplingParams(n=num_generations, temperature=temperature, top_p=top_p, top_k=-1,
                                max_tokens=max_new_tokens, seed=seed, stop_token_ids=[eos], ignore_eos=True,
                                logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        completions, logprobs = [], []
        for out in outputs:  # vLLM returns the requests in submission order
            for sample in out.outputs:
                ids = list(sample.token_ids)
                # logprobs=0: each step's dict holds the sampled token (processed: after temperature)
                logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, ids, strict=True)])
                if sample.finish_reason == "stop" and (not ids or ids[-1] != eos):
                    ids.append(eos)  # a stop token left out of token_ids: the EOS slot is kept
                completions.append(ids)
        return rollout_from_ids(prompt_ids, completions, num_generations, self.tokenizer, self.device, logprobs)

    @classmethod
    def for_policy(cls, policy, tokenizer, gpu_memory_utilization: float = 0.3, seed: int = 0) -> VLLMRollout:
        """An engine for the checkpoint the policy was loaded from, in the policy's dtype and device."""
        path = getattr(policy.config, "_name_or_path", None) or getattr(policy, "name_or_path", None)
        if not path:
            raise RuntimeError("grpo.rollout_backend=vllm needs a policy loaded from a checkpoint path or hub id")
        dtype = str(next(policy.parameters()).dtype).removeprefix("torch.")
        device = next(policy.parameters()).device
        return cls(path, tokenizer, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                   device=device)


__all__ = ["VLLMRollout", "rollout_from_ids"]
