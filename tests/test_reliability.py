"""Fault injection: damaged and interrupted checkpoint writes, NaN/Inf steps, hostile model output,
unreachable services. Each test names the fault and checks what the run did about it."""

from __future__ import annotations

import ast
import builtins
import copy
import json
import math
import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from oisd_lab.run import checkpointing
from oisd_lab.run.checkpointing import (
    AtomicCheckpointIO,
    CheckpointWarning,
    NonFiniteError,
    find_resumable,
    save_atomic,
    truncate_jsonl,
)

PACKAGE = Path(__file__).resolve().parents[1] / "oisd_lab"


def _ckpt(step: int, value: float = 1.0) -> dict:
    """A small Lightning-like checkpoint; 256 KiB of weights, so that its middle is tensor data."""
    return {"global_step": step, "epoch": 0, "state_dict": {"w": torch.full((65536,), value), "n": torch.tensor(step)}}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- atomic, verified checkpoints
def test_atomic_save_writes_file_and_digest_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "step=3.ckpt"
    save_atomic(_ckpt(3), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=3.ckpt", "step=3.ckpt.sha256"]
    assert (tmp_path / "step=3.ckpt.sha256").read_text() == checkpointing.file_digest(path)
    assert torch.load(path, weights_only=False)["global_step"] == 3


def test_a_write_killed_halfway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_atomic(_ckpt(2), path)
    before = path.read_bytes()

    def dies_halfway(obj, handle):
        handle.write(b"PK\x03\x04" + b"\0" * 1000)  # the first bytes of a zip, then the process "dies"
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        save_atomic(_ckpt(4), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]
    assert find_resumable(tmp_path).step == 2


def test_temporaries_of_a_killed_writer_are_removed_on_resume_and_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    save_atomic(_ckpt(2), tmp_path / "last.ckpt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f".last.ckpt.tmp{int(dead.stdout)}"  # a run SIGKILLed in the middle of a save
    stale.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    live = tmp_path / f".step=4.ckpt.tmp{os.getpid()}"  # a writer that is still at work
    live.write_bytes(b"PK\x03\x04")
    assert find_resumable(tmp_path).step == 2
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", "last.ckpt.sha256", live.name])


def test_checkpoint_io_refuses_non_finite_parameters(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "step=4.ckpt"
    io.save_checkpoint(_ckpt(2), path)
    before = path.read_bytes()
    poisoned = _ckpt(4)
    poisoned["state_dict"]["w"][7] = float("nan")
    with pytest.raises(NonFiniteError, match=r"parameter w is not finite at step 4"):
        io.save_checkpoint(poisoned, path)
    assert path.read_bytes() == before
    io.remove_checkpoint(path)
    assert list(tmp_path.iterdir()) == []


def _damage(kind: str, path: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "flipped_bits":  # still loads, with finite values; only the digest catches it
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0x01 for b in data[mid : mid + 64]) + data[mid + 64 :])
    elif kind == "nan_parameters":  # a sound file holding a poisoned model, written without our IO
        torch.save(_ckpt(9, float("nan")), path)
        (path.parent / (path.name + ".sha256")).unlink()
    elif kind == "not_lightning":
        torch.save({"weights": torch.ones(3)}, path)
        (path.parent / (path.name + ".sha256")).unlink()
    elif kind == "truncated_no_digest":
        path.write_bytes(data[: len(data) // 2])
        (path.parent / (path.name + ".sha256")).unlink()


@pytest.mark.parametrize(
    "kind, why",
    [
        ("truncated", "does not load (RuntimeError: PytorchStreamReader failed reading zip archive"),
        ("truncated_no_digest", "does not load"),
        ("garbage", "does not load"),
        ("empty", "does not load"),
        ("flipped_bits", "its bytes do not match its SHA-256 digest"),
        ("nan_parameters", "parameter w is not finite"),
        ("not_lightning", "not a Lightning checkpoint"),
    ],
)
def test_damaged_last_checkpoint_falls_back_to_the_newest_sound_one(tmp_path, kind, why):
    for step in (2, 4):
        save_atomic(_ckpt(step), tmp_path / f"step={step}.ckpt")
    save_atomic(_ckpt(6), tmp_path / "step=6.ckpt")
    save_atomic(_ckpt(6), tmp_path / "last.ckpt")
    _damage(kind, tmp_path / "last.ckpt")
    _damage("flipped_bits", tmp_path / "step=6.ckpt")
    messages: list[str] = []
    found = find_resumable(tmp_path, warn=messages.append)
    assert found.step == 4 and found.path.name == "step=4.ckpt"
    assert len(messages) == 2
    assert any("step=6.ckpt" in m and "SHA-256" in m for m in messages)
    last = next(m for m in messages if "last.ckpt" in m)
    assert why in last and str(tmp_path / "last.ckpt") in last


def test_resume_selection_warns_by_default_and_handles_no_checkpoints(tmp_path):
    assert find_resumable(tmp_path / "missing") is None
    save_atomic(_ckpt(2), tmp_path / "last.ckpt")
    _damage("truncated", tmp_path / "last.ckpt")
    with pytest.warns(CheckpointWarning, match=r"last\.ckpt is damaged"):
        assert find_resumable(tmp_path) is None


def test_truncate_jsonl_keeps_steps_up_to_the_checkpoint_and_drops_torn_lines(tmp_path):
    path = tmp_path / "completions.jsonl"
    rows = [{"step": s, "completion": f"c{s}-{i}"} for s in (1, 2, 3, 4) for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "compl')
    assert truncate_jsonl(path, 2) == 5
    assert [r["step"] for r in _rows(path)] == [1, 1, 2, 2]
    assert truncate_jsonl(path, 2) == 0
    assert truncate_jsonl(tmp_path / "absent.jsonl", 2) == 0


# ---------------------------------------------------------------- numerical faults
def _poison_step(monkeypatch, bad_step: int):
    """The loss of one step becomes NaN (as after an overflow or a NaN reward)."""
    from oisd_lab.module import OISDModule

    original = OISDModule.loss_terms

    def poisoned(self, part, norm, **kwargs):
        terms = original(self, part, norm, **kwargs)
        if self.global_step + 1 == bad_step:
            terms["loss/total"] = terms["loss/total"] * float("nan")
        return terms

    monkeypatch.setattr(OISDModule, "loss_terms", poisoned)


def _record_updates(monkeypatch) -> dict:
    """Parameters and optimizer state before and after each step's update."""
    from oisd_lab.module import OISDModule

    original, seen = OISDModule._clip_and_step, {}

    def snapshot(self, opt):
        return ({k: v.detach().clone() for k, v in self.policy.state_dict().items()},
                copy.deepcopy(opt.optimizer.state_dict()["state"]))

    def recording(self, opt, sched):
        step, before = self.global_step + 1, snapshot(self, opt)
        out = original(self, opt, sched)
        seen[step] = (before, snapshot(self, opt))
        return out

    monkeypatch.setattr(OISDModule, "_clip_and_step", recording)
    return seen


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not _same(x, y):
                return False
        elif not torch.equal(torch.as_tensor(x), torch.as_tensor(y)):
            return False
    return True


UPDATES = ("method=oisd", "method.weighting=uniform", "grpo.lr=1e-3", "num_threads=1", "log.wandb_mode=disabled")
"""Uniform alignment weights give every step a non-zero update, whatever the rewards."""


@pytest.mark.slow
def test_nan_loss_step_is_skipped_counted_and_never_applied(cache_dir, tmp_path, monkeypatch):
    from oisd_lab.config import compose
    from oisd_lab.train import train

    _poison_step(monkeypatch, bad_step=2)
    seen = _record_updates(monkeypatch)
    run = tmp_path / "run"
    cfg = compose(tiny_overrides(run, *UPDATES, "grpo.weight_decay=0.1", "checkpoint_every=1"))
    with pytest.warns(UserWarning, match=r"step 2: gradient norm is nan; update skipped \(1 skipped so far\)"):
        train(cfg, log=lambda *_: None)

    params, moments = 0, 1
    assert _same(seen[2][0][params], seen[2][1][params])  # weight decay did not touch them either
    assert _same(seen[2][0][moments], seen[2][1][moments])  # nor the Adam moments and step counts
    for step in (1, 3):
        assert not _same(seen[step][0][params], seen[step][1][params])
    assert int(next(iter(seen[3][1][moments].values()))["step"]) == 2  # two real updates in three steps

    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["skipped_steps"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[1]["grad_norm"] is None  # strict JSON: the NaN norm is recorded as null
    assert all(math.isfinite(r["grad_norm"]) for r in (rows[0], rows[2]))
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3 and last["oisd_counters"]["skipped_steps"] == 1
    assert checkpointing.first_nonfinite(last["state_dict"]) is None


@pytest.mark.slow
def test_nonfinite_stop_ends_the_run_with_one_line_and_a_failed_status(cache_dir, tmp_path, monkeypatch, capsys):
    from oisd_lab.cli import main

    _poison_step(monkeypatch, bad_step=2)
    run = tmp_path / "run"
    rc = main(["train", *tiny_overrides(run, *UPDATES, "grpo.nonfinite=stop", "checkpoint_every=1")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().splitlines()[-1] == ("error: grpo.nonfinite: gradient norm is nan at step 2; the run stops "
                                           "here (grpo.nonfinite=skip skips such steps)")
    assert "Traceback" not in err
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "NonFiniteError" in status["error"]
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step=1.ckpt"]
    assert find_resumable(run / "checkpoints").step == 1
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1]
    assert not (run / "final_model").exists()


def test_a_nan_or_raising_reward_scores_zero(tiny_model, char_tokenizer):
    from oisd_lab.config import compose
    from oisd_lab.sampler import Sampler

    def grader(text, answer):
        if text == "boom":
            raise RuntimeError("grader bug")
        return {"nan": float("nan"), "inf": float("inf")}.get(text, 1.0)

    sampler = Sampler(compose([]), tiny_model, char_tokenizer, reward=grader)
    assert [sampler.reward_of(t, "1") for t in ("nan", "inf", "boom", "ok")] == [0.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------- model output
HOSTILE = [
    "",
    "####",
    "#### " + "9" * 100_000,
    "x" * 1_000_000 + " #### 5",
    "\x00\x01\x02\xff\ufffe #### 5",
    "\udfff\ud800 lone surrogates #### 5",
    bytes(range(256)).decode("latin-1"),
    "\x1b[2J\x1b[31m#### 5\x1b[0m\r\u2028\u2029",
    "#### __import__('os').system('touch PWNED')",
    "#### exec(\"open('PWNED','w')\")",
    "#### eval('1+1')",
    "\\boxed{__import__('os').system('touch PWNED')}",
    "The answer is $__import__('os').system('touch PWNED')$ so \\boxed{exec('open(\"PWNED\", \"w\")')}",
    "#### 3; import os; os.system('touch PWNED')",
    "$(touch PWNED) `touch PWNED` {{7*7}} ${7*7}",
    "#### 1e999999",
    "#### nan",
    "#### ５",
    "\\frac{" * 3000 + "1" + "}{2}" * 3000,
    "\\boxed{" + "(" * 20_000 + ")" * 20_000 + "}",
    "$" + "\\sqrt{" * 2000 + "2" + "}" * 2000 + "$",
    "\\boxed{" * 500 + "5" + "}" * 500,
    "#### 2\n#### 3\n" * 10_000,
]


def _reward_functions() -> dict:
    from oisd_lab import rewards

    found = {name: fn for name, fn in vars(rewards).items() if name.endswith("_reward") and callable(fn)}
    assert "exact_match_reward" in found
    return found


PAYLOAD = re.compile(r"__import__|system|open|PWNED|touch|subprocess|exec\(|eval\(")
INERT_EVAL = re.compile(r"[\w\s()'\"+\-.,]*")
"""What sympy may `eval` while grading: constructor calls on literals (`Integer (3 )`, `Symbol ('yotta' )`).
math-verify turns a number it matched with its grammar into sympy.Number, whose sympify evaluates
such a call; that is the one way a piece of model text (digits) reaches `eval`."""


def _inert(text: str) -> bool:
    return bool(INERT_EVAL.fullmatch(text)) and "__" not in text and not re.search(r"[A-Za-z_]\s*\.\s*[A-Za-z_]", text)


def _text_source(source) -> str | None:
    """The text of source code run from a string (imports exec compiled module files: not those)."""
    if isinstance(source, (str, bytes)):
        return source if isinstance(source, str) else source.decode("utf-8", "replace")
    if hasattr(source, "co_filename") and not source.co_filename.endswith(".py"):
        return f"<code {source.co_filename}: {source.co_names}>"
    return None


def test_hostile_completions_are_graded_without_being_executed(tmp_path, monkeypatch):
    calls: list[str] = []
    evaluated: list[tuple[str, str]] = []
    functions = _reward_functions()
    for fn in functions.values():  # lazy imports of the graders happen here, before the trap is set
        fn("\\boxed{\\frac{1}{2}} #### 5", "5")

    def trap(name, real):
        def recorded(source, *args, **kwargs):
            text = _text_source(source)
            if text is not None:
                evaluated.append((name, text))
            return real(source, *args, **kwargs)
        return recorded

    def refuse(*args, **kwargs):
        calls.append(f"shell{args[:1]}")
        raise AssertionError("a shell was started while grading model output")

    monkeypatch.setattr(builtins, "eval", trap("eval", builtins.eval))
    monkeypatch.setattr(builtins, "exec", trap("exec", builtins.exec))
    monkeypatch.setattr(os, "system", refuse)
    monkeypatch.setattr(os, "popen", refuse)
    monkeypatch.chdir(tmp_path)
    for name, fn in functions.items():
        for text in HOSTILE:
            for answer in ("5", "2", "\\frac{1}{2}", ""):
                start = time.perf_counter()
                value = fn(text, answer)
                assert isinstance(value, float) and 0.0 <= value <= 1.0, (name, text[:40])
                assert time.perf_counter() - start < 15, (name, text[:40])
    assert calls == []
    assert not (tmp_path / "PWNED").exists()
    assert [text for _, text in evaluated if PAYLOAD.search(text)] == []
    assert [text for name, text in evaluated if name == "eval" and not _inert(text)] == []


def test_the_package_never_evaluates_text():
    """No eval/exec/compile call anywhere in oisd_lab (model.eval() is an attribute, not this)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                    "eval", "exec", "compile"):
                offenders.append(f"{path.name}:{node.lineno} {node.func.id}")
    assert offenders == []


def test_hostile_completions_stay_valid_json_lines(tmp_path):
    from oisd_lab.run_hooks import LogStepHook

    path = tmp_path / "completions.jsonl"
    rows = [{"step": 1, "completion": text, "reward": 0.0} for text in HOSTILE]
    LogStepHook.write_jsonl(path, rows)
    back = _rows(path)
    assert len(back) == len(HOSTILE)
    assert [r["completion"] for r in back] == HOSTILE
    path.read_bytes().decode("ascii")  # escaped: any reader, any locale


@pytest.mark.slow
def test_a_run_whose_model_writes_hostile_text_finishes(cache_dir, tmp_path, monkeypatch):
    import oisd_lab.sampler as module
    from oisd_lab.config import compose
    from oisd_lab.train import train

    original = module.generate

    def hostile_generate(*args, **kwargs):
        rollout = original(*args, **kwargs)
        rollout.texts = [HOSTILE[i % len(HOSTILE)] for i in range(len(rollout.texts))]
        return rollout

    monkeypatch.setattr(module, "generate", hostile_generate)
    run = tmp_path / "run"
    train(compose(tiny_overrides(run, "num_threads=1", "log.wandb_mode=offline")), log=lambda *_: None)
    rows = _rows(run / "completions.jsonl")
    assert [r["step"] for r in rows] == [1] * 16 + [2] * 16 + [3] * 16
    assert [r["completion"] for r in rows[:16]] == HOSTILE[:16]
    assert {r["reward"] for r in rows} <= {0.0, 1.0}
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert list((run / "wandb").glob("offline-run-*"))


def test_wandb_table_logging_takes_hostile_text(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from oisd_lab.run.tracking import wandb_env

    wandb_env(tmp_path)
    logger = WandbLogger(project="oisd_lab_tests", save_dir=str(tmp_path), mode="offline")
    logger.log_table(key="completions", columns=["step", "completion"], data=[[1, t] for t in HOSTILE[:12]])
    logger.log_metrics({"reward": float("nan")}, step=1)
    logger.experiment.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


# ---------------------------------------------------------------- services
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def no_wandb_service(monkeypatch, tmp_path):
    """No credentials anywhere, and a W&B server address where nothing listens."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WANDB_MODE", "online")
    (tmp_path / "home").mkdir()


def _cfg(run, *extra):
    from oisd_lab.config import compose

    return compose(tiny_overrides(run, "num_threads=1", *extra))


def test_wandb_without_credentials_falls_back_offline_and_says_how_to_sync(no_wandb_service, tmp_path):
    from oisd_lab.run.tracking import make_wandb_logger

    said: list[str] = []
    logger = make_wandb_logger(_cfg(tmp_path / "run", "log.wandb_mode=online"), tmp_path / "run", "abc12345",
                               log=said.append)
    assert logger._wandb_init["mode"] == "offline"
    assert said == ["W&B: not logged in; logging offline (upload later with "
                    "`wandb sync <run_dir>/wandb/offline-run-*`)"]


def _logged_in(monkeypatch) -> None:
    """As if credentials were found (a real key would stay cached in wandb for the whole process)."""
    from oisd_lab.run import tracking

    monkeypatch.setattr(tracking, "resolve_wandb_mode", lambda mode, log=print: mode)


def test_wandb_server_unreachable_falls_back_offline_fast(no_wandb_service, tmp_path, monkeypatch):
    from oisd_lab.run.tracking import make_wandb_logger

    _logged_in(monkeypatch)
    said: list[str] = []
    start = time.perf_counter()
    logger = make_wandb_logger(_cfg(tmp_path / "run", "log.wandb_mode=online"), tmp_path / "run", "abc12345",
                               log=said.append)
    assert time.perf_counter() - start < 5
    assert logger._wandb_init["mode"] == "offline"
    assert len(said) == 1 and "not reachable; logging offline" in said[0]
    assert f"wandb sync {tmp_path / 'run'}/wandb/offline-run-*" in said[0]


def test_wandb_online_start_failure_falls_back_offline(no_wandb_service, tmp_path, monkeypatch):
    import wandb

    from oisd_lab.run import tracking

    _logged_in(monkeypatch)
    monkeypatch.setattr(tracking, "wandb_reachable", lambda timeout=3.0: True)
    real_init = wandb.init

    def init(*args, **kwargs):
        if kwargs.get("mode") == "online":
            raise wandb.errors.CommError("Timed out while retrying")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    said: list[str] = []
    logger = tracking.make_wandb_logger(_cfg(tmp_path / "run", "log.wandb_mode=online"), tmp_path / "run",
                                        "abc12345", log=said.append)
    assert logger._wandb_init["mode"] == "offline"
    assert len(said) == 1 and said[0].startswith("W&B: online start failed (CommError: Timed out while retrying)")
    logger.experiment.finish()


@pytest.mark.slow
def test_training_finishes_when_wandb_is_unreachable(cache_dir, no_wandb_service, tmp_path, capsys):
    from oisd_lab.train import train

    run = tmp_path / "run"
    train(_cfg(run, "log.wandb_mode=online"))
    out = capsys.readouterr().out
    assert "W&B: not logged in; logging offline (upload later with `wandb sync" in out
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2, 3]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1


def test_unknown_model_id_offline_fails_fast_in_one_line(tmp_path, capsys, monkeypatch):
    from oisd_lab.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    rc = main(["train", f"run_dir={tmp_path / 'run'}", "model=nobody/no-such-model-xyz"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert rc == 2 and elapsed < 5
    assert err.startswith("error: model.name: cannot load 'nobody/no-such-model-xyz'") and err.count("\n") == 1
    assert "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "run").exists()
