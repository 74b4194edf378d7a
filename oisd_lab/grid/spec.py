"""Grid files and their cells: reading and checking a grid file, expanding its axes into cells,
run ids, and the Hydra overrides of each cell."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import EXECUTION_SETTINGS, compose, config_dir, to_dict
from ..errors import ConfigError

GRID_KEYS = ("name", "base", "axes")


SET_BY_GRID = ("run_dir",)


@dataclass
class Cell:
    index: int
    id: str
    """Readable and unique: `<method>-<task>-s<seed>[-<other axes>]-<run_id[:8]>`; its folder name."""
    run_id: str
    overrides: list[str]
    axes: dict[str, Any]
    method: str
    task: str
    seed: int

    def tags(self, grid: str) -> list[str]:
        return [f"grid:{grid}", *(_tag(f"{k}:{compact(v)}") for k, v in self.axes.items())]


@dataclass
class Grid:
    name: str
    file: str
    base: list[str]
    axes: dict[str, list]
    overrides: list[str] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)

    def manifest(self) -> dict:
        return {**asdict(self), "cells": [asdict(c) for c in self.cells]}


def find_grid_file(name: str) -> Path:
    """A path, or the name of a file in experiments/grids (`components`)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = config_dir() / "grids" / f"{name}.yaml"
    if preset.is_file():
        return preset
    known = ", ".join(sorted(p.stem for p in (config_dir() / "grids").glob("*.yaml")))
    raise ConfigError(f"{name}: no such grid file; the grids in experiments/grids are: {known}")


def load_grid(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check: bool = False) -> Grid:
    """Read, check and expand a grid file; every cell is composed (bad cells raise ConfigError).
    `check`: also check each cell against its task and model, as `train` would (`CellCheck`)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a grid file is a mapping with the keys {', '.join(GRID_KEYS)}")
    for key in data:
        if key not in GRID_KEYS:
            raise ConfigError(f"grid.{key}: unknown key; use {', '.join(GRID_KEYS)}")
    name = str(data.get("name") or path.stem)
    if not re.fullmatch(r"[\w.-]+", name):
        raise ConfigError(f"grid.name: '{name}' must be letters, digits, '_', '.' or '-'")
    base = data.get("base") or []
    if not isinstance(base, list) or not all(isinstance(b, str) and "=" in b for b in base):
        raise ConfigError(f"grid.base: expected a list of key=value strings, got {base!r}")
    axes = data.get("axes") or {}
    if not isinstance(axes, dict):
        raise ConfigError(f"grid.axes: expected a mapping of key -> list of values, got {axes!r}")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.axes.{key}: expected a non-empty list of values, got {values!r}")
    grid = Grid(name=name, file=str(path.resolve()), base=list(base), axes=dict(axes),
                overrides=list(overrides))
    grid.cells = expand(grid, CellCheck() if check else None)
    return grid


def expand(grid: Grid, check: Callable[[Any], None] | None = None) -> list[Cell]:
    """The cells of a grid in a fixed order (cartesian product, first axis slowest); `check` is
    called with each cell's composed config."""
    for item in [*grid.base, *grid.overrides]:
        if override_key(item) in SET_BY_GRID:
            raise ConfigError(f"{override_key(item)}: set by the grid (cells live in <grid dir>/cells); use --out")
    cells, seen = [], {}
    for index, values in enumerate(itertools.product(*grid.axes.values())):
        axes = dict(zip(grid.axes, values, strict=True))
        axis_overrides = [item for k, v in axes.items() for item in _axis_overrides(k, v)]
        label = " ".join(axis_overrides) or "the only cell"
        overrides = merge_overrides(grid.base, axis_overrides, grid.overrides)
        try:
            cfg = compose(overrides)
            if check is not None:
                check(cfg)
        except ConfigError as err:
            raise ConfigError(f"grid {grid.name}: cell {index} ({label}): {err}") from err
        run_id = config_hash(to_dict(cfg))
        if run_id in seen:
            raise ConfigError(f"grid {grid.name}: cells {seen[run_id]} and {index} ({label}) have the "
                              "same config; does an override replace an axis?")
        seen[run_id] = index
        cell_id = _cell_name(cfg, axes, run_id)
        cells.append(Cell(index, cell_id, run_id, overrides, axes, cfg.method.name, cfg.task.name, cfg.seed))
    return cells


class CellCheck:
    """Checks a cell's config as its `train` would before starting: the task source, and the student
    and diagnostic layers against the model's depth. Each task and model is looked at once."""

    def __init__(self) -> None:
        self.tasks: set[str] = set()
        self.depths: dict[str, int | None] = {}

    def __call__(self, cfg) -> None:
        # these import torch: only composing a grid needs them, not running or reading one
        from ..preflight import check_layers, model_depth
        from ..sources import load_source

        task_key = json.dumps(to_dict(cfg)["task"], sort_keys=True, default=str)
        if task_key not in self.tasks:
            load_source(cfg.task)
            self.tasks.add(task_key)
        model_key = cfg.pretrain.init or cfg.model.name
        if model_key not in self.depths:
            self.depths[model_key] = model_depth(cfg)
        if self.depths[model_key] is not None:
            check_layers(cfg, self.depths[model_key])


def _cell_name(cfg, axes: dict, run_id: str) -> str:
    """`oisd-arith-s0-1a2b3c4d`; other axes add `<last key part><value>` (`layers2`)."""
    parts = [cfg.method.name, cfg.task.name, f"s{cfg.seed}"]
    parts += [f"{k.rsplit('.', 1)[-1]}{compact(v)}" for k, v in axes.items()
              if k not in ("method", "task", "seed", RECIPE_AXIS)]
    if RECIPE_AXIS in axes:
        parts += [f"{k.rsplit('.', 1)[-1]}{compact(v)}" for k, v in axes[RECIPE_AXIS].items()]
    return re.sub(r"[^\w.=+-]", "_", "-".join(parts))[:80] + f"-{run_id[:8]}"


def config_hash(config: dict) -> str:
    """12 hex digits of the resolved config, execution settings excluded."""
    data = json.loads(json.dumps(config, default=str))
    for dotted in EXECUTION_SETTINGS:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


RECIPE_AXIS = "recipe"
"""An axis whose values are sets of overrides (`{model.lora_rank: 16, grpo.lr: 3e-4}`): one value
sets fields of several groups together, where a product of axes would cross them."""


def _axis_overrides(key: str, value: Any) -> list[str]:
    if key != RECIPE_AXIS:
        return [_axis_override(key, value)]
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"grid.axes.{RECIPE_AXIS}: each value is a mapping of config key -> value "
                          f"(e.g. {{grpo.dynamic_sampling: true}}), got {value!r}")
    return [_axis_override(k, v) for k, v in value.items()]


def _axis_override(key: str, value: Any) -> str:
    """`key=value`; a mapping replaces a dict field (`task.difficulty`), which needs Hydra's `++`."""
    prefix = "++" if isinstance(value, dict) and not key.startswith("+") else ""
    return f"{prefix}{key}={hydra_value(value)}"


def merge_overrides(*groups: list[str]) -> list[str]:
    """Concatenate override lists; a later value for the same key replaces the earlier one."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            if "=" not in item:
                raise ConfigError(f"{item}: overrides are key=value (e.g. method=oisd seed=1)")
            merged[override_key(item)] = item
    return list(merged.values())


def override_key(item: str) -> str:
    return item.partition("=")[0].lstrip("+~")


_PLAIN = re.compile(r"[A-Za-z_/][\w./-]*")


def hydra_value(value: Any) -> str:
    """A YAML value as a Hydra override value (lists and mappings included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in ("true", "false", "null", "none", "inf", "nan"):
        return text
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        return text  # YAML 1.1 reads `1e-4` as a string; Hydra reads it as the number meant
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compact(value: Any) -> str:
    """A short text form of an axis value for tags and table columns (`[1, 2]` -> `1-2`)."""
    if isinstance(value, (list, tuple)):
        return "-".join(compact(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}={compact(v)}" for k, v in value.items())
    return hydra_value(value).strip("'")


def _tag(text: str) -> str:
    return re.sub(r"[^\w.:=+-]", "_", text)[:64]
