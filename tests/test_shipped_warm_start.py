"""The default warm start ships with the package: the default config's cache key names it, its
files match their recorded SHA-256, a fresh cache gets a verified copy without pretraining, and an
altered file makes the warm start build as before."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from oisd_lab import pretrain as P
from oisd_lab.config import compose


def test_the_default_config_uses_the_shipped_warm_start():
    key = P.warm_start_key(compose([]))
    assert key in P.SHIPPED
    for name, digest in P.SHIPPED[key].items():
        assert P._sha256(P.SHIPPED_DIR / key / name) == digest, name


def _no_pretraining(*args, **kwargs):
    raise AssertionError("pretrained although a verified warm start ships with the package")


def test_a_fresh_cache_gets_a_verified_copy_without_pretraining(tmp_path, monkeypatch):
    from oisd_lab.models import load_pretrained

    monkeypatch.setattr(P, "pretrain", _no_pretraining)
    cfg = compose([f"pretrain.cache_dir={tmp_path}"])
    lines = []
    path = P.warm_start(cfg, log=lines.append)
    assert path == tmp_path / "base" / P.warm_start_key(cfg)
    assert lines == [f"warm start: the one shipped with the package (SHA-256 checked) -> {path}"]
    model, _ = load_pretrained(path)
    shipped = load_file(P.SHIPPED_DIR / path.name / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in shipped.items())
    assert P.warm_start(cfg, log=lines.append) == path and len(lines) == 1  # cached: no second copy


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_an_altered_shipped_file_builds_the_warm_start_instead(damage, tmp_path, monkeypatch):
    cfg = compose([f"pretrain.cache_dir={tmp_path / 'cache'}"])
    key = P.warm_start_key(cfg)
    shipped = tmp_path / "shipped"
    shutil.copytree(P.SHIPPED_DIR / key, shipped / key)
    weights = shipped / key / "model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0x01
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()
    built = []

    def fake_pretrain(cfg, out_dir, log=print):  # stands in for the 2-minute supervised run
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        built.append(out_dir)

    monkeypatch.setattr(P, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(P, "pretrain", fake_pretrain)
    lines = []
    path = P.warm_start(cfg, log=lines.append)
    assert len(built) == 1 and (path / "config.json").read_text() == "{}"
    assert lines[0] == f"warm start: the shipped {key} is incomplete or altered (model.safetensors); building it instead"
