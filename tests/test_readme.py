"""README.md's ```python snippets run as written, each in a fresh namespace from a scratch working directory; the
Hugging Face checkpoint path they name is swapped for a tiny checkpoint written here by `save_pretrained`."""

from __future__ import annotations

import pathlib
import re

import pytest

from dsv3_jax.io.hf import save_pretrained
from dsv3_jax.config.presets import get_preset
from tests.fast_compile import cheap_compiles  # noqa: F401  (an autouse fixture: XLA's cheapest compiles)
from tests.hf_oracle import random_variables

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
HF_PLACEHOLDER = "path/to/hf_checkpoint"


def readme_snippets() -> list[str]:
    return SNIPPET.findall(README.read_text())


def test_readme_has_python_snippets():
    assert readme_snippets(), f"no ```python snippet found in {README}"


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> pathlib.Path:
    config = get_preset("tiny")
    directory = tmp_path_factory.mktemp("hf_checkpoint")
    save_pretrained(config, random_variables(config, seed=0), directory)
    return directory


@pytest.mark.parametrize("index", range(len(readme_snippets())), ids=lambda i: f"snippet{i + 1}")
def test_readme_snippet_runs(index, hf_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # what a snippet writes ("out_dir") lands in the scratch directory
    code = readme_snippets()[index].replace(HF_PLACEHOLDER, str(hf_checkpoint))
    exec(compile(code, f"README.md python snippet {index + 1}", "exec"), {"__name__": "readme_snippet"})
