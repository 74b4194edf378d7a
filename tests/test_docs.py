"""The documentation in docs/ stays attached to the code: every citation of a doc from the package
names an existing file and section, every config field and package function a doc names exists,
and section 5's length formula is what the alignment loss does."""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
from pathlib import Path

import pytest
import torch

from oisd_lab import config, losses

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CITATION = re.compile(r"docs/([\w-]+\.md)(?:, (?:section (\d+)|\"([^\"]+)\"))?")


def _headings(doc: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")]


def _citations() -> list[tuple[str, str, str | None, str | None]]:
    found = []
    for path in sorted((ROOT / "oisd_lab").rglob("*.py")):
        text = " ".join(path.read_text().split())  # a citation may wrap over two lines
        found += [(str(path.relative_to(ROOT)), *m.groups()) for m in CITATION.finditer(text)]
    return found


def test_the_package_cites_docs_that_exist_by_section():
    citations = _citations()
    assert len(citations) >= 6, citations  # the finder itself works
    for where, name, section, title in citations:
        doc = DOCS / name
        assert doc.is_file(), f"{where} cites docs/{name}, which does not exist"
        heads = _headings(doc)
        if section:
            assert any(h.startswith(f"{section}. ") for h in heads), f"{where}: docs/{name} has no section {section}"
        if title:
            assert title in heads, f"{where}: docs/{name} has no heading {title!r}"


def test_the_docs_cite_each_other_by_existing_sections():
    refs = [(doc.name, *m) for doc in sorted(DOCS.glob("*.md"))
            for m in re.findall(r"([\w-]+\.md),\s+sections?\s+(\d+)(?:\s+and\s+(\d+))?", doc.read_text())]
    assert refs
    for where, name, *sections in refs:
        heads = _headings(DOCS / name)
        for section in filter(None, sections):
            assert any(h.startswith(f"{section}. ") for h in heads), f"{where}: {name} has no section {section}"


def test_the_readme_links_both_docs():
    readme = (ROOT / "README.md").read_text()
    for name in ("oisd-method.md", "grpo-conventions.md"):
        assert f"](docs/{name})" in readme and (DOCS / name).is_file()


def _fields() -> set[str]:
    groups = {f.name: f.type for f in dataclasses.fields(config.TrainConfig)}
    names = set(groups)
    for group in ("model", "task", "method", "grpo", "pretrain", "log", "eval"):
        cls = getattr(config, type(getattr(config.TrainConfig(), group)).__name__)
        names |= {f"{group}.{f.name}" for f in dataclasses.fields(cls)}
    return names


@functools.cache
def _top_level(module: str) -> set[str]:
    path = ROOT / "oisd_lab" / f"{module}.py"
    files = [path] if path.is_file() else sorted((ROOT / "oisd_lab" / module).glob("*.py"))  # a package
    names = set()
    for node in (node for file in files for node in ast.parse(file.read_text()).body):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return names


def test_every_config_field_and_function_the_docs_name_exists():
    fields = _fields()
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        for group, name in re.findall(r"`(method|grpo|log|model|task)\.(\w+)", text):
            assert f"{group}.{name}" in fields, f"{doc.name} names `{group}.{name}`, not a config field"
        for module, name in re.findall(r"`(losses|step|lens|module|attention)\.(?!py`)([\w.]+)`", text):
            assert name in _top_level(module), f"{doc.name} names `{module}.{name}`, not in oisd_lab/{module}.py"


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo", "grpo"])
def test_section_5_length_effect_is_what_alignment_loss_does(loss_type):
    """oisd-method.md, section 5: when every token shares one divergence gradient, signed weighting
    leaves B cov(A, |o|) / N of it under dapo, cov(A, |o|) / max_completion_length under dr_grpo,
    and nothing under grpo."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = losses.group_advantages(rewards, num_generations=4)
    lengths = torch.tensor([6, 2, 5, 3, 4, 6, 1, 2])
    B, T = 8, 6
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    x = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = losses.alignment_loss(x * torch.ones(B, T, dtype=torch.float64), mask, adv.double(), "signed", loss_type)
    (grad,) = torch.autograd.grad(loss, x)
    cov = sum((a - adv.mean()) * (n - lengths.float().mean()) for a, n in zip(adv, lengths, strict=True)) / B
    expected = {"dapo": B * cov / lengths.sum(), "dr_grpo": cov / T, "grpo": 0.0}[loss_type]
    assert abs(float(cov)) > 0.05  # the case has a length effect to find
    assert float(grad) == pytest.approx(float(expected), abs=1e-7)
