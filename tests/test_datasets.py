"""Real datasets through local files in each dataset's own schema, splits, batches, prompts, and the
one-line errors (offline hub, unknown names, bad files)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from oisd_lab.config import ConfigError, compose
from oisd_lab.sources import DatasetSource, load_source
from oisd_lab.tasks import datasets as ds

FIXTURES = Path(__file__).parent / "fixtures"


def source_of(*overrides: str):
    return load_source(compose(["model=smollm2", *overrides]).task)


def test_gsm8k_folder_with_train_and_test_files():
    src = source_of("task=gsm8k", f"task.path={FIXTURES / 'gsm8k'}")
    assert isinstance(src, DatasetSource)
    assert len(src.task.train) == 5 and len(src.task.test) == 3
    test = src.test_problems(10)
    assert [p.answer for p in test] == ["48", "180", "9"]
    assert test[0].prompt == "Mia buys 6 packs of 8 stickers. How many stickers does she have?"
    assert "<<" not in test[0].solution and test[0].solution.endswith("#### 48")
    assert {p.answer for p in src.task.train} == {"10", "20", "1000", "5", "12"}  # `#### 1,000`


def test_hub_snapshot_folder_reads_only_the_dataset_config(tmp_path):
    import shutil

    for config in ("main", "socratic"):  # openai/gsm8k ships one folder per config
        shutil.copytree(FIXTURES / "gsm8k", tmp_path / config)
    (tmp_path / "socratic" / "train.jsonl").write_text('{"question": "extra", "answer": "#### 1"}\n')
    src = source_of("task=gsm8k", f"task.path={tmp_path}")
    assert len(src.task.train) == 5 and len(src.task.test) == 3


def test_one_file_benchmark_is_cut_in_two_disjoint_stable_parts():
    a = source_of(f"task={FIXTURES / 'math500.jsonl'}")
    b = source_of("task=math500", f"task.path={FIXTURES / 'math500.jsonl'}")
    for src in (a, b):
        train, test = {p.prompt for p in src.task.train}, {p.prompt for p in src.task.test}
        assert train and test and not train & test and len(train | test) == 8
    assert [p.prompt for p in a.task.test] == [p.prompt for p in b.task.test]
    answers = {p.prompt: p.answer for p in a.task.train + a.task.test}
    assert answers["What is $\\frac{1}{2} + \\frac{1}{4}$?"] == "\\frac{3}{4}"
    assert answers["Find the point where the lines $y = x$ and $y = 2x - 1$ meet."] == "(1,1)"
    assert [ds.held_out(q, 0.5) for q in answers] == [ds.held_out(q, 0.5) for q in answers]


def test_train_data_makes_the_whole_benchmark_the_test_set_without_overlap():
    src = source_of("task=math500", f"task.path={FIXTURES / 'math500.jsonl'}",
                    f"task.train_data={FIXTURES / 'math_train.jsonl'}")
    assert len(src.task.test) == 8
    prompts = [p.prompt for p in src.task.train]
    assert len(prompts) == 3 and "What is $2^{10}$?" not in prompts  # also in the benchmark
    assert {p.answer for p in src.task.train} == {"21", "\\frac{1}{2}", "7"}  # last \boxed{} of solution


def test_aime_schemas_lower_and_capitalised_agree():
    lower = source_of("task=aime24", f"task.path={FIXTURES / 'aime24.jsonl'}")
    upper = source_of("task=aime24", f"task.path={FIXTURES / 'aime24_capitalised.jsonl'}")
    for attr in ("train", "test"):
        assert [(p.prompt, p.answer) for p in getattr(lower.task, attr)] == \
               [(p.prompt, p.answer) for p in getattr(upper.task, attr)]
    assert {p.answer for p in lower.task.train + lower.task.test} == {"2", "9", "27", "23"}


def test_amc_parquet_float_answers_become_integers():
    src = source_of(f"task={FIXTURES / 'amc23.parquet'}", f"task.train_data={FIXTURES / 'math_train.jsonl'}")
    assert [p.answer for p in src.test_problems(40)] == ["720", "8", "6", "6"]
    assert src.reward("The area is \\boxed{6}.", "6") == 1.0


def test_train_batch_is_a_pure_function_of_step_and_seed():
    src = source_of("task=gsm8k", f"task.path={FIXTURES / 'gsm8k'}")
    size = len(src.task.train)
    first = src.train_batch(3, 4, seed=1)
    assert first == src.train_batch(3, 4, seed=1)
    epoch = [p.prompt for p in src.train_batch(0, size, seed=1)]
    assert sorted(epoch) == sorted(p.prompt for p in src.task.train)  # one pass sees each once
    orders = {tuple(p.prompt for p in src.train_batch(0, size, seed=s)) for s in range(6)}
    assert len(orders) > 1
    assert src.train_batch(0, 2 * size + 1, seed=0)[: size] == src.train_batch(0, size, seed=0)


def test_test_problems_are_a_prefix_and_capped():
    src = source_of("task=gsm8k", f"task.path={FIXTURES / 'gsm8k'}")
    assert src.test_problems(2) == src.test_problems(3)[:2]
    assert len(src.test_problems(1000)) == 3


def test_prompt_templates_plain_and_chat(char_tokenizer):
    src = source_of("task=gsm8k", f"task.path={FIXTURES / 'gsm8k'}")
    q = "What is 2 + 3?"
    assert src.format_prompt(q) == "Question: What is 2 + 3?\nAnswer: Let's think step by step."
    assert src.format_prompt(q, char_tokenizer, chat=True) == src.format_prompt(q)  # no chat template
    char_tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = src.format_prompt(q, char_tokenizer, chat=True)
    assert chat == ("<user>What is 2 + 3?\nPlease reason step by step, and put your final answer "
                    "within \\boxed{}.</s><assistant>")


def test_real_datasets_grade_with_math_verify():
    src = source_of(f"task={FIXTURES / 'math500.jsonl'}")
    assert src.reward("so $\\boxed{0.75}$", "\\frac{3}{4}") == 1.0
    assert src.reward("#### 1,024", "1024") == 1.0
    assert src.reward("\\boxed{0.7}", "\\frac{3}{4}") == 0.0


def test_offline_hub_dataset_fails_fast_naming_task_path(monkeypatch):
    import datasets  # noqa: F401  (import time is not the failure's time)

    monkeypatch.setitem(ds.DATASETS, "nosuch", ds.DatasetSpec("nosuch", "oisd-lab-tests/no-such-dataset",
                                                              None, "train", "test"))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        ds.load_dataset_task("nosuch")
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert "\n" not in message and "task.path=" in message and "oisd-lab-tests/no-such-dataset" in message


def test_named_dataset_offline_fails_in_the_cli(capsys, tmp_path, monkeypatch):
    from oisd_lab.cli import main

    monkeypatch.setitem(ds.DATASETS, "gsm8k", ds.DatasetSpec("gsm8k", "oisd-lab-tests/gsm8k-missing", "main",
                                                             "train", "test"))
    start = time.perf_counter()
    assert main(["train", "task=gsm8k", "model=smollm2", f"run_dir={tmp_path / 'run'}"]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: task.name: cannot load 'gsm8k'") and "task.path=" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["task=local"], "task.path: the local task needs a file"),
        (["task=local", "task.path=/nonexistent/file.jsonl"], "does not exist"),
        (["task.name=nosuch"], "task.name: unknown task 'nosuch'"),
        (["task=amc23", "task.test_fraction=0.0"], "task.test_fraction"),
        ([f"task={FIXTURES / 'amc23.parquet'}", "task.train_data=nosuch"], "task.train_data: unknown dataset"),
    ],
)
def test_bad_task_settings_are_one_line_errors(overrides, expected):
    with pytest.raises(ConfigError) as err:
        source_of(*overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_file_without_a_question_field_names_the_fields(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hi", "label": 1}) + "\n")
    with pytest.raises(ConfigError) as err:
        source_of(f"task={bad}")
    assert "question field" in str(err.value) and "text, label" in str(err.value)


def test_tiny_models_refuse_real_datasets(tmp_path):
    from oisd_lab.train import train

    cfg = compose([f"task={FIXTURES / 'math500.jsonl'}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith("model.name: the tiny model 'tiny'")
    assert not (tmp_path / "run").exists()


def test_file_task_override_becomes_local_task():
    cfg = compose(["model=smollm2", f"task={FIXTURES / 'amc23.parquet'}"])
    assert cfg.task.name == "local" and cfg.task.path == str(FIXTURES / "amc23.parquet")


@pytest.mark.parametrize("name", ["gsm8k", "math500", "aime24", "amc23", "local"])
def test_task_presets_compose(name):
    cfg = compose(["model=smollm2", f"task={name}"])
    assert cfg.task.name == name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{ 2 }", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed{unbalanced", None),
        ("none", None),
    ],
)
def test_last_boxed(text, expected):
    assert ds.last_boxed(text) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("a\n#### 1,234", "1234"), (27.0, "27"), ("27.00", "27"), ("$5$", "5"), (" \\frac{1}{2} ", "\\frac{1}{2}"),
     ("12.5", "12.5")],
)
def test_clean_answer(value, expected):
    assert ds.clean_answer(value) == expected


PAPER = sorted(p.stem for p in (Path(__file__).parents[1] / "experiments" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipes_compose(name):
    cfg = compose([], config_name=f"paper/{name}")
    assert cfg.model.name == "Qwen/Qwen3-4B" and (cfg.model.dtype, cfg.precision) == ("float32", "bf16-mixed")
    assert cfg.model.gradient_checkpointing and cfg.method.layers == [6]
    assert (cfg.method.logit_weight, cfg.method.attn_weight) == ((1.0, 0.1) if "oisd" in name else (0.0, 0.0))
    assert cfg.task.name == "math500" and cfg.task.train_data == "math"


def test_train_command_takes_a_config_name():
    from oisd_lab.cli import build_parser

    args = build_parser("train").parse_args(["train", "--config", "paper/qwen3-4b-grpo", "seed=1"])
    assert args.config == "paper/qwen3-4b-grpo" and args.overrides == ["seed=1"]
    assert build_parser("train").parse_args(["train"]).config == "train"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [(["strategy=fsdp1"], "strategy: is fsdp1; use fsdp"),
     (["strategy=fsdp", "grpo.rollout_backend=vllm"], "grpo.rollout_backend: vllm under strategy=fsdp is not"),
     (["grpo.rollout_backend=sglang"], "grpo.rollout_backend: unknown value 'sglang'")],
)
def test_scale_out_settings_are_validated(overrides, expected):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert str(err.value).startswith(expected)
