"""The README's Python code blocks run as written.

Every fenced ``python`` block of ``README.md`` is executed in order in one namespace (later blocks may use
names from earlier ones), in a temporary working directory. The one change: ``PerturbDiff.train`` is capped at
a few optimiser steps, so the check is that every call, name and keyword in the README still exists and works
end to end, not how good a 1,500-step model is (the benchmarks and ``test_end_to_end_kang`` measure that).
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MAX_TEST_STEPS = 8


def python_blocks(text: str) -> list[str]:
    """The fenced ``python`` blocks of a markdown text, in order."""
    return [m.group(1) for m in FENCE.finditer(text)]


def test_python_blocks_are_found():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2, "README.md should show at least the notebook and the combinations examples"
    assert python_blocks("x\n```python\na = 1\n```\n```sh\nls\n```\n") == ["a = 1\n"]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from perturbdiff_scvi import PerturbDiff

    torch.set_num_threads(min(2, torch.get_num_threads()))
    original_train = PerturbDiff.train
    calls = []

    def short_train(self, *args, **kwargs):
        kwargs["max_steps"] = MAX_TEST_STEPS
        kwargs.pop("max_epochs", None)
        calls.append(kwargs)
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(PerturbDiff, "train", short_train)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("matplotlib.pyplot.show", lambda *a, **k: None)

    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(python_blocks(README.read_text())):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"README.md python block {i + 1} failed: {err!r}\n---\n{block}") from err

    assert calls, "the README never trains a model"
    pred = namespace.get("pred")
    assert pred is not None and pred.n_obs > 0
    assert "population" in pred.obs
