"""Config composition, presets, and one-line errors that name the field."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from oisd_lab.config import (
    ConfigError,
    compose,
    config_dir,
    load_yaml,
    method_presets,
    to_dict,
    to_yaml,
)
from oisd_lab.preflight import check_run_dir

PRESETS = {
    "grpo": (0.0, 0.0, "signed"),
    "oisd": (1.0, 0.1, "signed"),
    "oisd_logit": (1.0, 0.0, "signed"),
    "oisd_attn": (0.0, 0.1, "signed"),
    "oisd_unsigned": (1.0, 0.1, "unsigned"),
    "bupo": (0.0, 0.0, "signed"),
}


def test_defaults_are_the_main_job():
    cfg = compose([])
    assert (cfg.model.name, cfg.task.name, cfg.method.name) == ("tiny", "arith", "grpo")
    assert cfg.grpo.loss_type == "dapo" and cfg.grpo.num_generations == 8


@pytest.mark.parametrize("name", method_presets())
def test_method_presets_match_the_method_table(name):
    cfg = compose([f"method={name}"])
    assert (cfg.method.logit_weight, cfg.method.attn_weight, cfg.method.weighting) == PRESETS[name]
    assert cfg.method.name == name


def test_named_overrides_are_accepted_as_written(tmp_path):
    cfg = compose(["method=oisd", "task=linear", "model=tiny6m", "seed=3", "max_steps=7", f"run_dir={tmp_path}"])
    assert (cfg.method.name, cfg.task.name, cfg.model.name, cfg.seed, cfg.max_steps) == (
        "oisd", "linear", "tiny6m", 3, 7)
    assert cfg.run_dir == str(tmp_path)


def test_a_hub_id_or_path_is_a_model_name():
    assert compose(["model=Qwen/Qwen3-4B"]).model.name == "Qwen/Qwen3-4B"


def test_every_yaml_preset_loads_and_validates():
    root = config_dir()
    count = 0
    for group in ("model", "task", "method"):
        for path in sorted((root / group).glob("*.yaml")):
            if path.stem in ("hf", "local"):
                continue
            compose([f"{group}={path.stem}"])
            count += 1
    assert count >= 12


def test_resolved_config_round_trips(tmp_path):
    cfg = compose(["method=oisd", "method.layers=[2,-1,0.5]", "grpo.beta=0.04"])
    path = Path(tmp_path) / "config.yaml"
    path.write_text(to_yaml(cfg))
    back = load_yaml(path)
    assert back == cfg


@pytest.mark.parametrize("value, kept", [("sampling", "sampling"), ("0.7", 0.7), ("2", 2)])
def test_jsd_temperature_keeps_the_word_or_the_number_through_config_yaml(tmp_path, value, kept):
    cfg = compose(["method=oisd", f"method.jsd_temperature={value}"])
    assert cfg.method.jsd_temperature == kept
    path = Path(tmp_path) / "config.yaml"
    path.write_text(to_yaml(cfg))
    back = load_yaml(path)
    assert back == cfg and back.method.jsd_temperature == kept
    assert type(back.method.jsd_temperature) is type(kept)
    cfg.run_dir = str(tmp_path)  # resuming in that folder accepts the same setting, not another one
    check_run_dir(cfg)
    other = compose(["method=oisd", "method.jsd_temperature=1.5", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"method\.jsd_temperature"):
        check_run_dir(other)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["task=nope"], "task"),
        (["method=nope"], "method"),
        (["seed=abc"], "seed"),
        (["grpo.lr=fast"], "grpo.lr"),
        (["grpo.nope=1"], "grpo.nope"),
        (["nope=1"], "nope"),
        (["grpo.num_generations=1"], "grpo.num_generations"),
        (["grpo.prompts_per_step=3", "grpo.num_generations=5", "grpo.micro_batch_size=4"], "grpo.micro_batch_size"),
        (["grpo.loss_type=sum"], "grpo.loss_type"),
        (["grpo.scale_rewards=rank"], "grpo.scale_rewards"),
        (["method.logit_weight=-1"], "method.logit_weight"),
        (["method.attn_weight=-0.1"], "method.attn_weight"),
        (["method.weighting=both"], "method.weighting"),
        (["method.lens_grad=some"], "method.lens_grad"),
        (["method.layers=[a]"], "method.layers"),
        (["grpo.temperature=0"], "grpo.temperature"),
        (["method.jsd_temperature=0"], "method.jsd_temperature"),
        (["method.jsd_temperature=-1"], "method.jsd_temperature"),
        (["method.jsd_temperature=sample"], "method.jsd_temperature"),
        (["method.jsd_temperature=true"], "method.jsd_temperature"),
        (["max_steps=0"], "max_steps"),
        (["log.wandb_mode=cloud"], "log.wandb_mode"),
        (["seed"], "seed"),
    ],
)
def test_bad_settings_fail_in_one_line_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{field}:"), message


def test_batch_arithmetic_is_in_the_message():
    with pytest.raises(ConfigError, match="3 prompts x 5 generations = 15 completions"):
        compose(["grpo.prompts_per_step=3", "grpo.num_generations=5", "grpo.micro_batch_size=4"])


def test_a_new_method_preset_is_a_yaml_file_and_nothing_else(tmp_path, monkeypatch):
    configs = tmp_path / "experiments"
    shutil.copytree(config_dir(), configs)
    (configs / "method" / "oisd_half.yaml").write_text("name: oisd_half\nlogit_weight: 0.5\nattn_weight: 0.05\n")
    monkeypatch.setenv("OISD_LAB_CONFIG_DIR", str(configs))
    assert "oisd_half" in method_presets()
    cfg = compose(["method=oisd_half"])
    assert (cfg.method.name, cfg.method.logit_weight, cfg.method.attn_weight) == ("oisd_half", 0.5, 0.05)
    with pytest.raises(ConfigError, match=r"^method\.name: unknown value 'half'; choose one of .*oisd_half"):
        compose(["method=oisd_half", "method.name=half"])


def test_the_debug_preset_holds_the_small_settings():
    cfg = compose(["debug=quick"])
    # the default warm start (shipped with the package: nothing to pretrain), whose rewards vary
    assert (cfg.pretrain.steps, cfg.pretrain.batch_size, cfg.max_steps, cfg.checkpoint_every) == (500, 64, 3, 2)
    g = cfg.grpo
    assert (g.prompts_per_step, g.num_generations, g.micro_batch_size, g.max_completion_length) == (4, 4, 8, 32)
    assert (cfg.task.num_test, cfg.eval.k, cfg.log.every_n_steps, cfg.log.progress_bar) == (16, 2, 2, False)
    # a preset is a starting point: the method and explicit overrides still apply on top of it
    cfg = compose(["debug=quick", "method=oisd", "max_steps=5"])
    assert (cfg.method.name, cfg.max_steps, cfg.grpo.num_generations) == ("oisd", 5, 4)
    assert compose([]).max_steps == 150  # and it is off by default


def test_every_config_field_has_a_docstring():
    tree = ast.parse((Path(__file__).resolve().parents[1] / "oisd_lab" / "config.py").read_text())
    undocumented, fields = [], 0
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Config")):
        for node, after in zip(cls.body, [*cls.body[1:], None], strict=True):
            if isinstance(node, ast.AnnAssign):
                fields += 1
                if not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)):
                    undocumented.append(f"{cls.name}.{node.target.id}")
    assert fields >= 60 and undocumented == []


def test_the_execution_settings_are_among_those_a_resumed_run_may_change():
    from oisd_lab.config import EXECUTION_SETTINGS, RESUME_MAY_CHANGE
    from oisd_lab.grid.spec import config_hash

    assert set(EXECUTION_SETTINGS) < set(RESUME_MAY_CHANGE)
    base = to_dict(compose([]))
    moved = to_dict(compose(["num_threads=3", "log.every_n_steps=7", "run_dir=/tmp/elsewhere"]))
    assert config_hash(moved) == config_hash(base)  # execution settings stay out of the run id
    assert config_hash(to_dict(compose(["max_steps=7"]))) != config_hash(base)  # the run's length does not
