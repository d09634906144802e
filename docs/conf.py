"""Sphinx configuration of the d2sm-loss documentation.

Sphinx, because the docstrings are written in its language: they use the roles :func:, :class:,
:mod: and :data:, which autodoc and napoleon render and, with ``-n`` (nitpicky), check; a
reference to a name that does not exist fails the build. The guides are Markdown (myst-parser).
Build: ``sphinx-build -W --keep-going -n -b html docs docs/_build/html``. No intersphinx: the
build runs offline, so references to torch's own classes are rendered as plain text (see
``nitpick_ignore_regex``) instead of links.
"""

import importlib

import d2sm_loss

_MISSING = object()

project = "d2sm-loss"
author = "d2sm-loss contributors"
copyright = "d2sm-loss contributors"  # noqa: A001 (Sphinx's name)
release = d2sm_loss.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax 3 copied into the site (_static/mathjax): formulas render without a CDN.
    "sphinx-mathjax-offline",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath", "amsmath"]
# Literal blocks in docstrings (``::``) hold formulas and pseudo-code: shown as plain text, not
# highlighted as Python. Python examples are ``>>>`` lines or ``.. code-block:: python``.
highlight_language = "text"

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Overridden torch methods (forward, set_extra_state...) would inherit torch's docstrings, whose
# cross-references point into torch's own documentation.
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Names from other projects (torch, timm, the standard library's typing): without intersphinx
# (offline build) they cannot link anywhere; everything inside d2sm_loss must resolve.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|timm|torchvision|triton|numpy|np|typing|collections|pathlib|os)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|nn\.Module|Literal|Sequence|Mapping|Iterable|Callable|Path|PathLike)"),
    (r"py:.*", r"(optional|default|callable|int|float|str|bool|None|dict|list|tuple)"),
]



def _lookup(dotted):
    """The Python object at a dotted path such as ``d2sm_loss.weights.checkpoints.load_checkpoint``."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute, _MISSING)
        return obj
    return _MISSING


def _resolve_short_names(app, env, node, contnode):
    """Resolve a name that a docstring writes as its own module sees it (``packaged_weights`` in
    ``d2sm_loss.weights.checkpoints``, or ``d2sm_loss.weights.checkpoints.load_checkpoint``) to the one documented
    object that is the same: public objects are documented where users import them
    (``d2sm_loss.packaged_weights``). A name that matches no documented object, or several, stays a
    broken reference and fails the build."""
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    target = node["reftarget"].lstrip(".~")
    matches = [name for name in domain.objects if name.endswith("." + target)]
    if not matches and "." in target:  # a full path to the defining module
        obj = _lookup(target)
        tail = "." + target.rsplit(".", 1)[1]
        matches = [name for name in domain.objects if name.endswith(tail) and _lookup(name) is obj is not _MISSING]
    if len(matches) != 1:
        return None
    for role in (node["reftype"], "obj"):  # "obj": a type alias named in a signature is data, not a class
        resolved = domain.resolve_xref(env, node["refdoc"], app.builder, role, matches[0], node, contnode)
        if resolved is not None:
            return resolved
    return None


def setup(app):
    app.connect("missing-reference", _resolve_short_names)


html_theme = "furo"
html_title = f"d2sm-loss {release}"
# Long code lines wrap instead of scrolling sideways (checked at 1280 px by .ci/check_pages.py).
html_static_path = ["_static"]
html_css_files = ["wrap.css"]
