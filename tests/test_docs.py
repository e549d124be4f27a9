"""Every public object has documentation for the API reference (no Sphinx build; a few seconds).

The documentation site (``docs/``) generates its API pages from the ``__all__`` of each public subpackage, so a
name in ``__all__`` without a docstring would give an empty page. This checks, for ``perturbdiff_scvi`` (its
subpackages excluded), ``metrics``, ``baselines``, ``tl``, ``pl`` and ``datasets``, that every name in ``__all__``
resolves and is documented:

- functions and classes: a non-empty docstring of their own (not one inherited from a base class), with no
  leftover docrep ``%(...)s`` placeholder;
- constants (dicts, tuples, ...): a ``#:`` comment above, or a string literal below, their assignment in the
  module that defines them (what the docs show for them).

It also checks the model's own methods that the API page documents.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import types
from pathlib import Path

import pytest

PUBLIC_MODULES = [
    "perturbdiff_scvi",
    "perturbdiff_scvi.metrics",
    "perturbdiff_scvi.baselines",
    "perturbdiff_scvi.tl",
    "perturbdiff_scvi.pl",
    "perturbdiff_scvi.datasets",
]

#: Methods of ``PerturbDiff`` that the API reference documents (``get_*_embedding`` methods are found by name).
MODEL_METHODS = ["setup_anndata", "setup_mudata", "train", "predict_population", "save", "load", "history"]


def _public_names(modname: str) -> list[tuple[str, object]]:
    mod = importlib.import_module(modname)
    names = getattr(mod, "__all__", None)
    assert names, f"{modname} has no __all__"
    return [(name, getattr(mod, name)) for name in names if not isinstance(getattr(mod, name, None), types.ModuleType)]


def _cases() -> list[tuple[str, str]]:
    return [(modname, name) for modname in PUBLIC_MODULES for name, _ in _public_names(modname)]


def own_docstring(obj) -> str:
    """The docstring written on ``obj`` itself, stripped ('' when there is none or it is only inherited)."""
    func = getattr(obj, "__func__", None) or getattr(obj, "fget", None) or obj
    doc = func.__dict__.get("__doc__") if isinstance(func, type) else getattr(func, "__doc__", None)
    return (doc or "").strip()


@functools.cache
def _docs_conf():
    """``docs/conf.py`` as a module: the checks read constants' docs the way the API pages render them."""
    path = Path(__file__).resolve().parents[1] / "docs" / "conf.py"
    spec = importlib.util.spec_from_file_location("_perturbdiff_docs_conf", path)
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


def constant_doc(name: str, obj) -> str:
    """The ``#:`` comment above (or string literal below) ``name = ...`` that the docs show ('' when none)."""
    found = _docs_conf().attribute_doc(name, obj)
    return found[0].strip() if found else ""


def doc_problem(name: str, obj) -> str | None:
    """Why ``obj`` (public as ``name``) is not documented, or ``None`` when it is."""
    if inspect.isclass(obj) or callable(obj):
        doc = own_docstring(obj)
        if not doc:
            return "has no docstring of its own"
        if "%(" in doc:
            return "has an unfilled docrep placeholder '%(...)s'"
        return None
    if not constant_doc(name, obj):
        return "is a constant without a '#:' comment above its assignment"
    return None


@pytest.mark.parametrize(("modname", "name"), _cases())
def test_public_name_is_documented(modname, name):
    mod = importlib.import_module(modname)
    assert hasattr(mod, name), f"{modname}.__all__ lists {name!r}, which does not resolve"
    problem = doc_problem(name, getattr(mod, name))
    assert problem is None, f"{modname}.{name} {problem}"


def test_every_public_module_is_covered():
    import perturbdiff_scvi

    submodules = {n for n in perturbdiff_scvi.__all__ if isinstance(getattr(perturbdiff_scvi, n), types.ModuleType)}
    covered = {m.rsplit(".", 1)[1] for m in PUBLIC_MODULES[1:]}
    assert submodules <= covered, f"public subpackages without a docs check: {sorted(submodules - covered)}"
    assert {"PerturbDiff", "PAPER_CONFIG"} <= set(perturbdiff_scvi.__all__)


def test_model_methods_are_documented():
    from perturbdiff_scvi import PerturbDiff

    names = MODEL_METHODS + [n for n in dir(PerturbDiff) if n.startswith("get_") and n.endswith("_embedding")]
    missing = [n for n in names if not hasattr(PerturbDiff, n)]
    assert not missing, f"PerturbDiff lacks {missing}"
    undocumented = [n for n in names if not own_docstring(inspect.getattr_static(PerturbDiff, n))]
    assert not undocumented, f"PerturbDiff methods without a docstring: {undocumented}"


def test_the_check_can_fail():
    def undocumented():
        pass

    def placeholder():
        """Parameters: %(devices)s."""

    class Child(ValueError):
        pass  # inherits ValueError's docstring only

    assert doc_problem("undocumented", undocumented) == "has no docstring of its own"
    assert "placeholder" in doc_problem("placeholder", placeholder)
    assert doc_problem("Child", Child) == "has no docstring of its own"
    assert doc_problem("NOT_A_PACKAGE_CONSTANT", {"a": 1}) is not None
    assert doc_problem("documented", doc_problem) is None
