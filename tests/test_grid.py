"""Grid files, expansion and run ids, the SLURM dry run, and the local runner end to end: skip
finished cells, isolate and retry a failed one, survive a kill and resume."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_overrides

from oisd_lab import grid as G
from oisd_lab.cli import main
from oisd_lab.config import ConfigError, compose, config_dir


def write_grid(path: Path, name="t", base=(), axes=None, **extra) -> Path:
    path.write_text(yaml.safe_dump({"name": name, "base": list(base), "axes": axes or {}, **extra}, sort_keys=False))
    return path


def tiny_base(*extra: str) -> list[str]:
    return [*tiny_overrides("unused")[1:], "log.wandb_mode=disabled", *extra]


# ---------------------------------------------------------------------------- files and expansion


@pytest.mark.slow
def test_every_grid_file_loads_and_validates():
    files = sorted((config_dir() / "grids").glob("*.yaml"))
    expected = {"components": 5 * 4 * 3, "layers": 5 * 3, "weights": 3 * 3 * 3, "smoke": 2 * 2}
    assert {f.stem for f in files} >= set(expected)
    for path in files:
        grid = G.load_grid(path)
        assert grid.name == path.stem
        assert len(grid.cells) == math.prod(len(v) for v in grid.axes.values())
        assert len({c.run_id for c in grid.cells}) == len({c.id for c in grid.cells}) == len(grid.cells)
        if path.stem in expected:
            assert len(grid.cells) == expected[path.stem], path.stem
    components = G.load_grid(config_dir() / "grids" / "components.yaml")
    assert [(c.method, c.task, c.seed) for c in components.cells[:4]] == [
        ("grpo", "arith", 0), ("grpo", "word", 0), ("grpo", "linear", 0), ("grpo", "sequence", 0)]
    assert {c.method for c in components.cells} == {"grpo", "oisd_logit", "oisd_attn", "oisd", "oisd_unsigned"}


def test_expansion_is_ordered_deterministic_and_ids_are_stable(tmp_path):
    axes = {"method": ["grpo", "oisd"], "seed": [0, 1]}
    path = write_grid(tmp_path / "g.yaml", base=["max_steps=3"], axes=axes)
    first, again = G.load_grid(path), G.load_grid(path)
    assert [(c.index, c.method, c.seed) for c in first.cells] == [
        (0, "grpo", 0), (1, "grpo", 1), (2, "oisd", 0), (3, "oisd", 1)]
    assert [c.id for c in first.cells] == [c.id for c in again.cells]
    assert first.cells[2].id == f"oisd-arith-s0-{first.cells[2].run_id[:8]}"
    assert first.cells[2].overrides == ["max_steps=3", "method=oisd", "seed=0"]
    # the same resolved config gives the same id, however it was spelled
    moved = G.load_grid(write_grid(tmp_path / "h.yaml", base=[], axes=axes), ["max_steps=3"])
    assert [c.run_id for c in moved.cells] == [c.run_id for c in first.cells]
    # execution settings are not part of the id; any other field is
    quiet = G.load_grid(path, ["log.every_n_steps=7", "num_threads=3", "log.tags=[x]"])
    assert [c.run_id for c in quiet.cells] == [c.run_id for c in first.cells]
    longer = G.load_grid(path, ["max_steps=4"])
    assert not {c.run_id for c in longer.cells} & {c.run_id for c in first.cells}
    lr = G.load_grid(path, ["grpo.lr=2e-4"])
    assert not {c.run_id for c in lr.cells} & {c.run_id for c in first.cells}
    assert G.config_hash({"a": 1, "log": {"x": 1}, "run_dir": "p"}) == G.config_hash({"a": 1})
    assert G.config_hash({"a": 1}) != G.config_hash({"a": 2})


def test_axis_values_become_hydra_overrides(tmp_path):
    assert G.hydra_value([1, -2]) == "[1,-2]"
    assert G.hydra_value({"max_value": 5, "ops": "+"}) == "{max_value:5,ops:'+'}"
    assert G.hydra_value(None) == "null" and G.hydra_value(True) == "true" and G.hydra_value(0.3) == "0.3"
    assert G.hydra_value("a b'c") == "'a b\\'c'" and G.hydra_value("null") == "'null'"
    assert G.hydra_value("1e-4") == "1e-4"  # YAML 1.1 reads 1e-4 as a string
    assert G.compact([1, 2]) == "1-2"
    path = write_grid(tmp_path / "g.yaml", axes={"method.layers": [[2], [1, 3]],
                                                  "task.difficulty": [{"max_value": 5, "ops": "+"}]})
    cells = G.load_grid(path).cells
    assert [c.id.rsplit("-", 1)[0] for c in cells] == [
        "grpo-arith-s0-layers2-difficultymax_value=5-ops=+", "grpo-arith-s0-layers1-3-difficultymax_value=5-ops=+"]
    cfg = compose(cells[1].overrides)
    assert cfg.method.layers == [1, 3] and cfg.task.difficulty == {"max_value": 5, "ops": "+"}


def test_a_recipe_axis_sets_fields_of_several_groups_together_without_crossing_them(tmp_path):
    path = write_grid(tmp_path / "g.yaml", axes={
        "recipe": [{"grpo.advantage_estimator": "rloo"}, {"model.lora_rank": 4, "grpo.lr": 2e-4}],
        "method": ["grpo", "oisd"]})
    cells = G.load_grid(path).cells
    assert [c.id.rsplit("-", 1)[0] for c in cells] == [
        "grpo-arith-s0-advantage_estimatorrloo", "oisd-arith-s0-advantage_estimatorrloo",
        "grpo-arith-s0-lora_rank4-lr0.0002", "oisd-arith-s0-lora_rank4-lr0.0002"]
    first, lora = compose(cells[0].overrides), compose(cells[3].overrides)
    assert first.grpo.advantage_estimator == "rloo" and first.model.lora_rank == 0 and first.grpo.lr == 3e-5
    assert lora.model.lora_rank == 4 and lora.grpo.lr == 2e-4 and lora.grpo.advantage_estimator != "rloo"
    assert lora.method.name == "oisd"
    with pytest.raises(ConfigError, match=r"grid.axes.recipe: each value is a mapping"):
        G.load_grid(write_grid(tmp_path / "b.yaml", axes={"recipe": ["grpo.lr=1e-4"]}))


def test_cell_command_sets_run_dir_threads_group_and_tags(tmp_path):
    grid = G.load_grid(write_grid(tmp_path / "g.yaml", name="abl", base=["max_steps=3"],
                                  axes={"method": ["oisd"], "method.layers": [[2]]}))
    cell = grid.cells[0]
    command = G.cell_command(grid, cell, tmp_path / "cells" / cell.id)
    assert command[:4] == [sys.executable, "-m", "oisd_lab", "train"]
    cfg = compose(command[4:])
    assert cfg.run_dir == str((tmp_path / "cells" / cell.id).resolve())
    assert (cfg.num_threads, cfg.log.wandb_group, cfg.max_steps) == (1, "abl", 3)
    assert cfg.log.tags == ["grid:abl", "method:oisd", "method.layers:2"]
    # a grid that sets a grid-set key keeps its own value, once
    own = G.load_grid(write_grid(tmp_path / "h.yaml", base=["num_threads=2", "log.tags=[mine]"]))
    command = G.cell_command(own, own.cells[0], tmp_path / "x")
    assert sum(a.startswith("num_threads=") for a in command) == 1
    assert compose(command[4:]).num_threads == 2 and compose(command[4:]).log.tags == ["mine"]


def test_unknown_grid_key_is_one_line(tmp_path, capsys):
    path = write_grid(tmp_path / "g.yaml", foo=1)
    with pytest.raises(ConfigError) as err:
        G.load_grid(path)
    assert str(err.value) == "grid.foo: unknown key; use name, base, axes"
    assert main(["grid", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "error: grid.foo: unknown key; use name, base, axes\n"
    assert not (tmp_path / "out").exists()
    for data, message in (({"axes": {"seed": 3}}, "grid.axes.seed: expected a non-empty list"),
                          ({"base": "max_steps=3"}, "grid.base: expected a list of key=value strings"),
                          ({"base": ["run_dir=x"]}, "run_dir: set by the grid")):
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=message):
            G.load_grid(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="nosuchgrid: no such grid file; the grids in experiments/grids are: .*components"):
        G.find_grid_file("nosuchgrid")


def test_a_bad_cell_stops_the_grid_before_anything_runs(tmp_path, capsys):
    path = write_grid(tmp_path / "g.yaml", name="bad", axes={"seed": [0, 1], "method.attn_weight": [0.1, -1]})
    assert main(["grid", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == ("error: grid bad: cell 1 (seed=0 method.attn_weight=-1): method.attn_weight: "
                   "is -1.0; use a value >= 0\n")
    assert not (tmp_path / "out").exists()
    # a cell whose layer the model does not have is caught before any cell runs, not inside it
    path = write_grid(tmp_path / "l.yaml", name="deep", base=["model=tiny"], axes={"method.layers": [[2], [9]]})
    assert main(["grid", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: grid deep: cell 1 (method.layers=[9]): method.layers: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    path = write_grid(tmp_path / "h.yaml", name="bad", axes={"grpo.nope": [1]})
    with pytest.raises(ConfigError, match=r"^grid bad: cell 0 \(grpo.nope=1\): grpo.nope: unknown config key"):
        G.load_grid(path)
    # a command-line override that replaces an axis would make cells identical
    path = write_grid(tmp_path / "i.yaml", name="dup", axes={"seed": [0, 1]})
    with pytest.raises(ConfigError, match="cells 0 and 1 .* have the same config"):
        G.load_grid(path, ["seed=5"])


def test_dry_run_lists_cells_and_commands_and_writes_nothing(tmp_path, capsys):
    path = write_grid(tmp_path / "g.yaml", name="dry", axes={"method": ["grpo", "oisd"]})
    assert main(["grid", str(path), "seed=4", "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"[grid dry] 2 cells in {tmp_path / 'out'}; 2 to run (2 new)"
    commands = [line for line in out if line.startswith(sys.executable)]
    assert len(commands) == 2 and all("seed=4" in c and "log.wandb_group=dry" in c for c in commands)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- SLURM


def test_slurm_dry_run_builds_one_sbatch_script_per_cell(tmp_path, capsys):
    pytest.importorskip("submitit")
    from oisd_lab.cli import build_parser

    path = write_grid(tmp_path / "g.yaml", name="sl", axes={"seed": [0, 1]})
    argv = ["grid", str(path), "--out", str(tmp_path / "out"), "--launcher", "slurm", "--slurm-partition",
            "debug", "--slurm-time", "30", "--slurm-cpus", "4", "--slurm-gpus", "1", "--slurm-mem", "8",
            "--slurm-account", "lab", "--slurm-setup", "module load cuda", "--dry-run"]
    args = build_parser("grid").parse_args(argv)
    grid = G.load_grid(path)
    commands = [G.cell_command(grid, c, G.cell_dir(tmp_path / "out", c), 4) for c in grid.cells]
    scripts = [G.slurm_script(G.slurm_parameters(args, grid, c), command)
               for c, command in zip(grid.cells, commands, strict=True)]
    assert len(scripts) == 2 and scripts[0] != scripts[1]
    for cell, text, command in zip(grid.cells, scripts, commands, strict=True):
        lines = text.splitlines()
        assert lines[0] == "#!/bin/bash"
        for expected in (f"#SBATCH --job-name=sl-{cell.id}", "#SBATCH --partition=debug", "#SBATCH --time=30",
                         "#SBATCH --cpus-per-task=4", "#SBATCH --gpus-per-node=1", "#SBATCH --mem=8GB",
                         "#SBATCH --account=lab", "#SBATCH --nodes=1", "module load cuda"):
            assert expected in lines, expected
        assert lines[-1] == shlex.join(command) and "num_threads=4" in lines[-1]
    # through the command line: the commands use the job's cpus as threads, nothing is written
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("num_threads=4") == 3 and "#SBATCH --partition=debug" in out  # 2 commands + 1 script
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("srun") is not None, reason="a SLURM cluster is present")
def test_slurm_launcher_without_a_cluster_is_a_one_line_error(tmp_path, capsys):
    pytest.importorskip("submitit")
    path = write_grid(tmp_path / "g.yaml", name="sl", axes={"seed": [0]})
    assert main(["grid", str(path), "--out", str(tmp_path / "out"), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --launcher slurm: ") and err.count("\n") == 1


# ---------------------------------------------------------------------------- the runner, end to end


def _status(folder: Path) -> dict:
    return json.loads((folder / "status.json").read_text())


def _cells(grid_dir: Path) -> list[Path]:
    return [grid_dir / "cells" / c["id"] for c in json.loads((grid_dir / "grid.json").read_text())["cells"]]


@pytest.mark.slow
def test_failed_cell_is_isolated_recorded_and_only_it_is_retried(tmp_path, cache_dir, capsys, tiny_model,
                                                                   char_tokenizer):
    # a checkpoint whose config reads fine (the grid's up-front checks pass) but whose weights are
    # damaged: the cell fails when it loads them
    broken = tmp_path / "no_checkpoint"
    tiny_model.save_pretrained(broken)
    char_tokenizer.save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    path = write_grid(tmp_path / "g.yaml", name="iso", base=tiny_base(),
                      axes={"pretrain.init": [None, str(broken)]})
    out = tmp_path / "grid"
    assert main(["grid", str(path), "--out", str(out), "--workers", "2"]) == 1
    printed = capsys.readouterr().out
    good, bad = _cells(out)
    assert "[grid iso] done 1 | running 0 | failed 1 | left 0" in printed
    assert "1/2 cells finished" in printed and f"failed {bad.name}: error: pretrain.init:" in printed
    assert _status(good)["status"] == "finished" and (good / "eval.json").is_file()
    failed = _status(bad)
    assert (failed["status"], failed["returncode"], failed["attempts"]) == ("failed", 2, 1)
    assert failed["error"].startswith("error: pretrain.init: cannot load the checkpoint in ") and "no_checkpoint" in failed["error"]
    assert failed["log_tail"][-1] == failed["error"]
    assert "==== attempt 1" in (bad / "log.txt").read_text()
    manifest = json.loads((out / "grid.json").read_text())
    assert [c["axes"]["pretrain.init"] for c in manifest["cells"]] == [None, str(tmp_path / "no_checkpoint")]
    before = (good / "status.json").read_bytes(), (good / "log.txt").read_bytes()

    # second invocation: the finished cell is untouched, the failed one is retried
    assert main(["grid", str(path), "--out", str(out)]) == 1
    assert ((good / "status.json").read_bytes(), (good / "log.txt").read_bytes()) == before
    assert _status(bad)["attempts"] == 2 and (bad / "log.txt").read_text().count("==== attempt") == 2
    capsys.readouterr()

    # --no-retry-failed runs nothing and still reports the failure
    assert main(["grid", str(path), "--out", str(out), "--no-retry-failed"]) == 1
    assert _status(bad)["attempts"] == 2 and "[grid iso] done 1 | running 0 | failed 1 | left 0" in capsys.readouterr().out

    from oisd_lab.collect import collect

    summary = collect(out)
    assert summary["missing"] == [bad.name] and summary["run_ids"] == [manifest["cells"][0]["run_id"]]
    missing = pd.read_csv(out / "missing.csv")
    assert missing[["cell", "status"]].values.tolist() == [[bad.name, "failed"]]


@pytest.mark.slow
def test_killed_runner_stops_its_cells_and_the_rerun_resumes_only_unfinished(tmp_path, cache_dir):
    path = write_grid(tmp_path / "g.yaml", name="kill",
                      base=tiny_base("max_steps=6", "checkpoint_every=2", "log.every_n_steps=3"),
                      axes={"seed": [0, 1]})
    out = tmp_path / "grid"
    env = dict(os.environ, OISD_LAB_CACHE=str(cache_dir))
    runner = subprocess.Popen([sys.executable, "-m", "oisd_lab", "grid", str(path), "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "grid.json").is_file() and time.time() < deadline:
            time.sleep(0.05)
        first, second = _cells(out)
        # kill once the second cell has written a checkpoint, before it finishes
        while not (second / "checkpoints" / "last.ckpt").is_file() and time.time() < deadline:
            assert runner.poll() is None, runner.stdout.read()
            time.sleep(0.05)
        child = _status(second)["pid"]
        runner.send_signal(signal.SIGTERM)
        log = runner.communicate(timeout=60)[0]
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 130, log
    assert "interrupted; running cells were stopped" in log
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the cell's process was killed and reaped with the runner
    assert _status(first)["status"] == "finished" and _status(second)["status"] == "interrupted"
    finished_first = (first / "status.json").read_bytes()

    assert main(["grid", str(path), "--out", str(out)]) == 0
    assert (first / "status.json").read_bytes() == finished_first  # not rerun
    assert (_status(first)["attempts"], _status(second)["attempts"]) == (1, 2)
    resumed = (second / "log.txt").read_text().split("==== attempt 2")[1]
    assert "Restoring states from the checkpoint" in resumed or "Restored all states" in resumed
    steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6] and len(steps) == len(set(steps))

    from oisd_lab.collect import collect

    summary = collect(out)
    results = pd.read_parquet(out / "results.parquet")
    assert summary["missing"] == [] and pd.read_csv(out / "missing.csv").empty
    assert sorted(results["seed"].unique().tolist()) == [0, 1]
    assert not results.duplicated(["run_id", "metric"]).any()
    per_run = results.groupby("run_id")["metric"].apply(set)
    assert per_run.iloc[0] == per_run.iloc[1]
    assert {"greedy_acc", "avg_at_k", "greedy_acc_before", "avg_at_k_before", "train_seconds",
            "reward_last10", "layer/lens_acc/L01"} <= per_run.iloc[0]

    # a third invocation has nothing left to do
    statuses = [(c / "status.json").read_bytes() for c in (first, second)]
    assert main(["grid", str(path), "--out", str(out)]) == 0
    assert [(c / "status.json").read_bytes() for c in (first, second)] == statuses
