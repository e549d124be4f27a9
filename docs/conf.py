"""Sphinx configuration of the perturbdiff-scvi documentation.

Build (warnings are errors)::

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

Two folders are generated at build time and are git-ignored:

- ``api/generated/``: one page per public subpackage and one stub per public object, written from each
  subpackage's ``__all__`` (:func:`write_api_pages`), so a new public function appears without editing a page;
- ``tutorials/``: the executed notebooks of ``../tutorials/*.ipynb``, copied as they are (their stored outputs are
  shown, nothing is re-executed) plus a generated index (:func:`copy_tutorials`).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pprint
import shutil
import sys
import textwrap
import warnings
from datetime import date
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # a source checkout builds even without `pip install -e .`

# sphinx-autodoc-typehints 3.6 calls an API that Sphinx 9 deprecates; the message is noise in the build log.
warnings.filterwarnings("ignore", message=".*set_application.*is deprecated", module="sphinx_autodoc_typehints")

# -- Project information ---------------------------------------------------------------------------------------------

project = "perturbdiff-scvi"
author = "perturbdiff-scvi developers"
copyright = f"{date.today().year}, {author}"
try:
    release = _dist_version("perturbdiff-scvi")
except PackageNotFoundError:  # pragma: no cover
    release = "0.0.0"
version = release

# -- General configuration -------------------------------------------------------------------------------------------

extensions = [
    "myst_nb",  # markdown pages (MyST) and notebooks; includes myst_parser
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinx.ext.mathjax",
    "sphinxcontrib.bibtex",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
templates_path: list[str] = []

# MyST / myst-nb
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath", "html_image"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tutorials are committed executed; the docs show their stored outputs
nb_merge_streams = True
# Stored notebooks can hold widget outputs (progress bars); they have no static rendering.
suppress_warnings = ["mystnb.unknown_mime_type"]

# autodoc / autosummary / napoleon (numpydoc style only)
autosummary_generate = False  # the stubs are written by write_api_pages() below
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
# Overrides of torch / Lightning / scvi-tools hooks without a docstring of their own would otherwise show the parent's
# docstring, written for another documentation site (its roles and labels do not exist here).
autodoc_inherit_docstrings = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
typehints_defaults = "braces"
typehints_use_signature = False
always_use_bars_union = True

# bibliography (docs/references.bib; cite with {cite:p}`Key` in pages, :cite:p:`Key` in docstrings)
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"

# -- HTML ------------------------------------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "perturbdiff-scvi"
html_theme_options = {
    "repository_url": "https://github.com/perturbdiff-scvi/perturbdiff-scvi",
    "use_repository_button": False,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
html_show_sourcelink = False

# -- API pages from __all__ ------------------------------------------------------------------------------------------

PACKAGE = "perturbdiff_scvi"

#: (subpackage, title) of the user API, in the order of the API page.
USER_API = [
    ("perturbdiff_scvi", "Model and presets"),
    ("perturbdiff_scvi.tl", "Tools: evaluation and populations (tl)"),
    ("perturbdiff_scvi.pl", "Plots (pl)"),
    ("perturbdiff_scvi.metrics", "Metrics"),
    ("perturbdiff_scvi.baselines", "Baselines"),
    ("perturbdiff_scvi.datasets", "Bundled datasets"),
]
#: The building blocks, for developers (their names not already shown in the user API).
DEVELOPER_API = [
    ("perturbdiff_scvi.model", "Model internals (model)"),
    ("perturbdiff_scvi.module", "Module and losses (module)"),
    ("perturbdiff_scvi.nn", "Set denoiser (nn)"),
    ("perturbdiff_scvi.diffusion", "Diffusion maths (diffusion)"),
    ("perturbdiff_scvi.data", "Sets and splits (data)"),
]
#: Members inherited from scvi-tools that users need; every other inherited scvi-tools member is left out.
INHERITED_FROM_SCVI = ("history",)

API_DIR = HERE / "api" / "generated"


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _heading(title: str, char: str = "=") -> str:
    return f"{title}\n{char * len(title)}\n"


def _is_ours(obj) -> bool:
    return getattr(obj, "__module__", "") is not None and getattr(obj, "__module__", "").startswith(PACKAGE)


def attribute_doc(name: str, obj) -> tuple[str, str] | None:
    """The ``#:`` comment (or string after it) documenting a module-level constant, and its defining module.

    Searched in every imported module of the package that binds ``name`` to the same object.
    """
    for modname, mod in sorted(sys.modules.items()):
        if not (modname == PACKAGE or modname.startswith(PACKAGE + ".")) or getattr(mod, name, None) is not obj:
            continue
        try:
            source = inspect.getsource(mod)
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        body = ast.parse(source).body
        for i, node in enumerate(body):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
                continue
            comment = []
            j = node.lineno - 2
            while j >= 0 and lines[j].lstrip().startswith("#:"):
                comment.insert(0, lines[j].lstrip()[2:].strip())
                j -= 1
            if not comment and i + 1 < len(body):
                nxt = body[i + 1]
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    if isinstance(nxt.value.value, str):
                        comment = inspect.cleandoc(nxt.value.value).splitlines()
            if comment:
                return "\n".join(comment), modname
    return None


def _own_doc(member) -> str:
    """The docstring written on ``member`` itself (unwrapping classmethod, staticmethod and property)."""
    func = getattr(member, "__func__", None) or getattr(member, "fget", None) or member
    return (getattr(func, "__doc__", None) or "").strip()


def _class_members(cls) -> list[str]:
    """Public members defined by our own classes of the MRO, plus INHERITED_FROM_SCVI; dataclass fields excluded
    (they are documented in the class docstring's Attributes section)."""
    fields = set(getattr(cls, "__dataclass_fields__", {}))
    names: list[str] = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith(PACKAGE):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or name in fields or name in names:
                continue
            if not _own_doc(member):
                # An undocumented override of a framework hook (e.g. Lightning's ``train_dataloader``): autodoc
                # would show the framework's docstring, written for another doc site (its roles and labels).
                continue
            names.append(name)
    for name in INHERITED_FROM_SCVI:
        if hasattr(cls, name) and name not in names:
            names.append(name)
    return names


def _object_stub(modname: str, name: str, obj) -> str:
    full = f"{modname}.{name}"
    out = [_heading(full), f".. currentmodule:: {modname}\n"]
    if inspect.isclass(obj):
        members = _class_members(obj)
        out.append(f".. autoclass:: {name}")
        if members:
            out.append(f"   :members: {', '.join(members)}")
        out.append("   :show-inheritance:\n")
    else:
        out.append(f".. autofunction:: {name}\n")
    return "\n".join(out)


def _data_entry(name: str, obj) -> str:
    found = attribute_doc(name, obj)
    doc = found[0] if found else ""
    value = textwrap.indent(pprint.pformat(obj, width=100, sort_dicts=False), "      ")
    return (
        f".. py:data:: {name}\n   :type: {type(obj).__name__}\n\n"
        + textwrap.indent(doc, "   ")
        + f"\n\n   .. code-block:: python\n\n{value}\n"
    )


def _subpackage_page(modname: str, title: str, skip: set[int]) -> tuple[str, dict[str, str]]:
    """The page of one subpackage, and the stubs of its objects (file name -> text)."""
    mod = importlib.import_module(modname)
    names = list(mod.__all__)
    callables, data, modules = [], [], []
    for name in names:
        obj = getattr(mod, name)
        if id(obj) in skip:
            continue
        if inspect.ismodule(obj):
            modules.append(name)
        elif inspect.isclass(obj) or callable(obj):
            callables.append((name, obj))
        else:
            data.append((name, obj))
    out = [f".. _api-{modname}:\n", _heading(title), f".. automodule:: {modname}\n", f".. currentmodule:: {modname}\n"]
    stubs = {}
    if callables:
        out += [".. autosummary::", "   :toctree: .", "   :nosignatures:", ""]
        out += [f"   {name}" for name, _ in callables]
        out.append("")
        stubs = {f"{modname}.{name}.rst": _object_stub(modname, name, obj) for name, obj in callables}
    if data:
        out.append(_heading("Constants", "-"))
        out += [_data_entry(name, obj) for name, obj in data]
    if modules:
        out.append(_heading("Subpackages", "-"))
        out += [f"- :doc:`{PACKAGE}.{name}`" for name in modules]
        out.append("")
    return "\n".join(out), stubs


def write_api_pages() -> None:
    """Write ``api/generated/``: a page per subpackage with an autosummary of its ``__all__`` and object stubs."""
    pages: dict[str, str] = {}
    shown: set[int] = set()
    for group in (USER_API, DEVELOPER_API):
        for modname, title in group:
            page, stubs = _subpackage_page(modname, title, skip=shown if group is DEVELOPER_API else set())
            pages[f"{modname}.rst"] = page
            pages.update(stubs)
        if group is USER_API:
            for modname, _ in USER_API:
                mod = importlib.import_module(modname)
                shown |= {id(getattr(mod, n)) for n in mod.__all__ if not inspect.ismodule(getattr(mod, n))}
    for stale in API_DIR.glob("*.rst") if API_DIR.exists() else []:
        if stale.name not in pages:
            stale.unlink()
    for fname, text in pages.items():
        _write_if_changed(API_DIR / fname, text)


# -- Tutorials: copy the executed notebooks --------------------------------------------------------------------------

TUTORIALS_SRC = ROOT / "tutorials"
TUTORIALS_DST = HERE / "tutorials"

TUTORIALS_INDEX = """\
# Tutorials

Executed notebooks on the bundled datasets. They are stored with their outputs in the repository's `tutorials/`
folder and shown here as they are (the docs build does not run them; `pytest --nbmake tutorials` does).

{body}
"""


def copy_tutorials() -> None:
    """Mirror ``../tutorials/*.ipynb`` into ``docs/tutorials/`` and write its index (works with no notebook)."""
    TUTORIALS_DST.mkdir(exist_ok=True)
    sources = sorted(TUTORIALS_SRC.glob("*.ipynb")) if TUTORIALS_SRC.is_dir() else []
    keep = {p.name for p in sources} | {"index.md"}
    for old in TUTORIALS_DST.iterdir():
        if old.name not in keep:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for src in sources:
        dst = TUTORIALS_DST / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
    if sources:
        body = "```{toctree}\n:maxdepth: 1\n\n" + "\n".join(p.stem for p in sources) + "\n```"
    else:
        body = "No tutorial notebooks are in `tutorials/` yet."
    _write_if_changed(TUTORIALS_DST / "index.md", TUTORIALS_INDEX.format(body=body))


def setup(app):
    app.connect("builder-inited", lambda _app: (write_api_pages(), copy_tutorials()))
