"""Sphinx configuration for the stargate documentation.

Build with warnings as errors, as the tests do::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from stargate import __version__  # noqa: E402  (the one source of the version)

project = "stargate"
author = "the stargate authors"
copyright = "2010-2025, the stargate authors"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]

exclude_patterns = ["_build", "examples"]
templates_path = []
html_static_path = []
# furo: a current theme whose code blocks scroll instead of being cut off.
html_theme = "furo"
html_title = f"stargate {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "none"
# Everything stargate needs is installed: nothing is mocked.

# topics/performance.rst is written with the benchmarks and lands on its own
# schedule: list it in the table of contents only once it exists.
_PERFORMANCE = os.path.join(HERE, "topics", "performance.rst")
_TOPICS_ANCHOR = "   topics/limits\n"


def _add_performance(app, docname, source):
    if docname == "index" and os.path.exists(_PERFORMANCE):
        source[0] = source[0].replace(
            _TOPICS_ANCHOR, _TOPICS_ANCHOR + "   topics/performance\n", 1
        )


def setup(app):
    app.connect("source-read", _add_performance)
