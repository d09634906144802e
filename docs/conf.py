"""Sphinx configuration of the d2sm-loss documentation.

Sphinx, because the docstrings are written in its language: they use the roles :func:, :class:,
:mod: and :data:, which autodoc and napoleon render and, with ``-n`` (nitpicky), check; a
reference to a name that does not exist fails the build. The guides are Markdown (myst-parser).
Build: ``sphinx-build -W --keep-going -n -b html docs docs/_build/html``. No intersphinx: the
build runs offline, so references to torch's own classes are rendered as plain text (see
``nitpick_ignore_regex``) instead of links.
"""

import d2sm_loss

project = "d2sm-loss"
author = "d2sm-loss contributors"
copyright = "d2sm-loss contributors"  # noqa: A001 (Sphinx's name)
release = d2sm_loss.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Names from other projects (torch, timm, the standard library's typing): without intersphinx
# (offline build) they cannot link anywhere; everything inside d2sm_loss must resolve.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|timm|torchvision|triton|numpy|np|typing|collections|pathlib|os)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|nn\.Module|Literal|Sequence|Mapping|Iterable|Callable|Path|PathLike)"),
    (r"py:.*", r"(optional|default|callable|int|float|str|bool|None|dict|list|tuple)"),
]

html_theme = "furo"
html_title = f"d2sm-loss {release}"
