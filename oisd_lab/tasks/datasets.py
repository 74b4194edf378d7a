"""Real math datasets by name (Hugging Face hub) or as local JSONL/Parquet files in the same schema.

| name      | hub id (config)                         | splits      | fields read                                |
|-----------|-----------------------------------------|-------------|--------------------------------------------|
| `gsm8k`   | `openai/gsm8k` (`main`)                 | train, test | question, answer (`... #### 72`)           |
| `math500` | `HuggingFaceH4/MATH-500`                | test        | problem, solution, answer                  |
| `aime24`  | `HuggingFaceH4/aime_2024`               | train (30)  | problem, answer (id, solution)             |
| `amc23`   | `math-ai/amc23`                         | test (40)   | question, answer (`27.0`)                  |
| `math`    | `DigitalLearningGmbH/MATH-lighteval`    | train, test | problem, solution (answer = last \\boxed{}) |

Local files (`task=local task.path=file.jsonl`, or `task=gsm8k task.path=...` to replace the hub copy
of a named dataset) are read with `datasets` too. The question is the first of `problem`,
`question`, `prompt` (any capitalisation, so `Maxwell-Jia/AIME_2024`'s `Problem`/`Answer` work);
the answer is the first of `answer`, `final_answer`, `expected_answer`, else the last `\\boxed{}` of
`solution`; an answer with `####` keeps the text after the last `####` (GSM8K). A directory path is
searched for files whose name starts with each split name (`train*.jsonl`, `test-0000.parquet`, the
layout of a downloaded hub snapshot); a single file is one split.

Splits. A dataset with a train and a test split trains on train and evaluates on test. A
benchmark that ships one split (MATH-500, AIME24, AMC23, a single local file) is cut in two by a
stable hash of each question: a problem is held out iff its hash falls below `task.test_fraction`,
so train and test never share a problem and the cut never changes between runs. To evaluate on a
whole benchmark, name another source of training problems with `task.train_data` (a dataset name
or a local file); the test set is then every problem of the benchmark. MATH-500 is a subset of the
MATH test split, so `task=math500 task.train_data=math` trains on the MATH train split without
overlap.

Training batches are a pure function of (step, seed): each pass over the training problems is a
seeded permutation, and step s takes the problems at positions s*n .. s*n+n-1 of the concatenated
passes. The held-out set is the test problems in dataset order (the first `task.num_test`).
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oisd_lab.errors import ConfigError, first_line
from oisd_lab.rewards import last_boxed
from oisd_lab.tasks.synthetic import Problem

QUESTION_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "final_answer", "expected_answer")
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

PLAIN_TEMPLATE = "Question: {question}\nAnswer: Let's think step by step."
CHAT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset lives and how to read it."""

    name: str
    hub_id: str
    config: str | None
    train_split: str | None
    """Hub split with training problems; None for single-split benchmarks."""
    test_split: str
    plain_template: str = PLAIN_TEMPLATE
    chat_template: str = CHAT_TEMPLATE


DATASETS: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec("gsm8k", "openai/gsm8k", "main", "train", "test"),
    "math500": DatasetSpec("math500", "HuggingFaceH4/MATH-500", None, None, "test"),
    "aime24": DatasetSpec("aime24", "HuggingFaceH4/aime_2024", None, None, "train"),
    "amc23": DatasetSpec("amc23", "math-ai/amc23", None, None, "test"),
    "math": DatasetSpec("math", "DigitalLearningGmbH/MATH-lighteval", None, "train", "test"),
}
LOCAL = DatasetSpec("local", "", None, None, "test")
"""A local file with no named schema: fields are detected."""


# ---------------------------------------------------------------- answers and rows


def clean_answer(value: Any) -> str:
    """A reference answer as text: GSM8K's `#### 1,234` -> `1234`, `27.0` -> `27`, `$5$` -> `5`."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        text = tail.splitlines()[0].replace(",", "") if tail else ""
    if re.fullmatch(r"[+-]?\d+\.0+", text):
        text = text.split(".")[0]
    return text.strip().strip("$").strip()


def _field(row: Mapping[str, Any], names: Sequence[str]) -> str | None:
    lower = {str(k).lower(): k for k in row}
    for name in names:
        key = lower.get(name)
        if key is not None and row[key] is not None and str(row[key]).strip():
            return key
    return None


def row_to_problem(row: Mapping[str, Any], where: str) -> Problem:
    """One dataset row as a `Problem(prompt=question, solution, answer)`."""
    q_key = _field(row, QUESTION_FIELDS)
    if q_key is None:
        raise ConfigError(
            f"task.path: {where} has no question field (one of {', '.join(QUESTION_FIELDS)}); "
            f"its fields are {', '.join(map(str, row))}"
        )
    a_key, s_key = _field(row, ANSWER_FIELDS), _field(row, ("solution",))
    if s_key is None and a_key is not None and "####" in str(row[a_key]):
        s_key = a_key  # GSM8K: the worked solution is the answer field
    solution = str(row[s_key]) if s_key is not None else ""
    if a_key is not None:
        answer = clean_answer(row[a_key])
    else:
        answer = last_boxed(solution) or ""
    if not answer:
        raise ConfigError(
            f"task.path: {where} has no answer (a field {', '.join(ANSWER_FIELDS)}, or a \\boxed{{}} "
            f"in `solution`); its fields are {', '.join(map(str, row))}"
        )
    solution = re.sub(r"<<[^<>]*>>", "", solution)  # GSM8K calculator annotations
    return Problem(prompt=str(row[q_key]).strip(), solution=solution, answer=answer)


# ---------------------------------------------------------------- loading


@contextmanager
def _quiet_datasets():
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was:
            datasets.enable_progress_bars()


def _split_files(path: Path) -> dict[str, list[str]]:
    """Data files of a local file or directory, by split name."""
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise ConfigError(f"task.path: {path} is not .jsonl, .json or .parquet")
        return {"data": [str(path)]}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
        raise ConfigError(f"task.path: no .jsonl, .json or .parquet files in {path}")
    out: dict[str, list[str]] = {}
    for p in files:
        split = re.split(r"[-_.]", p.name, maxsplit=1)[0].lower()
        out.setdefault(split, []).append(str(p))
    return out


def load_local(path: str | Path, config: str | None = None) -> dict[str, list[dict]]:
    """Rows of a local JSONL/Parquet file (one split, `data`) or directory (splits by file name;
    in a hub snapshot with one folder per config, only the `config` folder)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"task.path: {path} does not exist; give a .jsonl/.parquet file or a folder of them")
    if config and (path / config).is_dir():
        path = path / config
    out = {}
    with _quiet_datasets() as datasets:
        for split, files in _split_files(path).items():
            kinds = {FILE_SUFFIXES[Path(f).suffix] for f in files}
            if len(kinds) > 1:
                raise ConfigError(f"task.path: split '{split}' mixes JSON and Parquet files in {path}")
            try:
                ds = datasets.load_dataset(kinds.pop(), data_files={split: files}, split=split)
            except Exception as err:
                first = first_line(err) or type(err).__name__
                raise ConfigError(f"task.path: cannot read {path}: {first}") from err
            out[split] = ds.to_list()
    return out


def load_hub(spec: DatasetSpec) -> dict[str, list[dict]]:
    """Rows of the splits of a named dataset, through `datasets.load_dataset(hub_id, config)`.

    Offline (HF_DATASETS_OFFLINE=1) a dataset that is not in the local cache fails at once."""
    splits = [s for s in (spec.train_split, spec.test_split) if s]
    out = {}
    with _quiet_datasets() as datasets:
        for split in dict.fromkeys(splits):
            try:
                ds = datasets.load_dataset(spec.hub_id, spec.config, split=split)
            except Exception as err:
                first = first_line(err) or type(err).__name__
                raise ConfigError(
                    f"task.name: cannot load '{spec.name}' ({spec.hub_id}) from the hub or its cache "
                    f"({first}); give a local copy in the same schema: task.path=/path/to/{spec.name}.jsonl"
                ) from err
            out[split] = ds.to_list()
    return out


def held_out(question: str, fraction: float) -> bool:
    """True iff a single-split benchmark's problem belongs to the held-out part (stable hash)."""
    return zlib.crc32(question.encode("utf-8")) / 2**32 < fraction


# ---------------------------------------------------------------- the task


class DatasetTask:
    """A real dataset as a task: a fixed list of training problems and of held-out problems."""

    def __init__(self, name: str, train: list[Problem], test: list[Problem], spec: DatasetSpec):
        self.name = name
        self.train = train
        self.test = test
        self.spec = spec

    def train_batch(self, step: int, n: int, seed: int) -> list[Problem]:
        """`n` training problems for `step`: a pure function of (step, n, seed)."""
        size = len(self.train)
        out, index = [], step * n
        perm, epoch = None, -1
        for i in range(index, index + n):
            if i // size != epoch:
                epoch = i // size
                perm = list(range(size))
                random.Random(f"{self.name}:{seed}:{epoch}").shuffle(perm)
            out.append(self.train[perm[i % size]])
        return out

    def problems(self, split: str, n: int, seed: int = 0) -> list[Problem]:
        """The first `n` problems of `split` in dataset order (all of them if fewer)."""
        pool = self.test if split == "test" else self.train
        return pool[:n]


def _rows_of(name: str, path: str | None) -> tuple[DatasetSpec, dict[str, list[dict]], str]:
    spec = DATASETS.get(name, LOCAL)
    if path:
        return spec, load_local(path, spec.config), str(path)
    if name == "local":
        raise ConfigError("task.path: the local task needs a file: task.path=/path/to/file.jsonl")
    if name not in DATASETS:
        raise ConfigError(f"task.name: unknown dataset '{name}'; choose one of {', '.join(DATASETS)} "
                          "or give a local file with task.path=/path/to/file.jsonl")
    return spec, load_hub(spec), spec.hub_id


def _problems(rows: list[dict], where: str) -> list[Problem]:
    return [row_to_problem(row, f"{where} (row {i})") for i, row in enumerate(rows)]


def _pick_splits(spec: DatasetSpec, rows: dict[str, list[dict]]) -> tuple[list[dict] | None, list[dict]]:
    """(train rows or None, test rows) of a loaded source; None means: cut the test rows."""
    if "data" in rows and len(rows) == 1:
        return None, rows["data"]
    test_name = spec.test_split if spec.test_split in rows else ("test" if "test" in rows else None)
    if test_name is None:
        if len(rows) == 1:
            return None, next(iter(rows.values()))
        raise ConfigError(f"task.path: no test split among {', '.join(rows)}; name files test*.jsonl")
    train_name = spec.train_split if spec.train_split in rows else ("train" if "train" in rows else None)
    return (rows[train_name] if train_name and train_name != test_name else None), rows[test_name]


def load_dataset_task(name: str, path: str | None = None, train_data: str | None = None,
                      test_fraction: float = 0.5) -> DatasetTask:
    """Build a real-dataset task; every problem in it fails loudly here, not mid-run."""
    spec, rows, where = _rows_of(name, path)
    train_rows, test_rows = _pick_splits(spec, rows)
    test = _problems(test_rows, where)
    if train_data:
        extra = Path(train_data).expanduser()
        is_file = extra.exists() or extra.suffix in FILE_SUFFIXES
        try:
            t_spec, t_rows, t_where = _rows_of("local" if is_file else train_data,
                                               str(extra) if is_file else None)
        except ConfigError as err:
            reason = str(err).split(": ", 1)[-1].replace("task.path=", "task.train_data=")
            raise ConfigError(f"task.train_data: {reason}") from err
        t_train, t_test = _pick_splits(t_spec, t_rows)
        train = _problems(t_train if t_train is not None else t_test, t_where)
        held = {p.prompt for p in test}
        train = [p for p in train if p.prompt not in held]
    elif train_rows is not None:
        train = _problems(train_rows, where)
    else:
        train = [p for p in test if not held_out(p.prompt, test_fraction)]
        test = [p for p in test if held_out(p.prompt, test_fraction)]
    if not test:
        raise ConfigError(f"task.test_fraction: no held-out problems in {where} (fraction {test_fraction})")
    if not train:
        raise ConfigError(f"task.train_data: no training problems for {name}; set task.train_data "
                          "to a dataset name or a local file, or lower task.test_fraction")
    return DatasetTask(name, train, test, spec)


__all__ = ["DATASETS", "DatasetSpec", "DatasetTask", "clean_answer", "last_boxed",
           "load_dataset_task", "row_to_problem"]
