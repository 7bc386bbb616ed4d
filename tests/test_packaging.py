"""The package as users install it: static metadata, one version, a licence,
the extras people ask for, and the ``stargate`` command's ``--version``.

The wheel's contents and a docs build from ``stargate[docs]`` alone are
checked by ``.ci/run`` (they need a build and a fresh virtual environment).
"""

import importlib.metadata
import pathlib
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

import stargate

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def metadata():
    return importlib.metadata.metadata("stargate")


def requirements(metadata, extra):
    """The requirements of ``extra``, by project name (lower case)."""
    found = {}
    for line in metadata.get_all("Requires-Dist") or ():
        requirement = Requirement(line)
        if requirement.marker and requirement.marker.evaluate({"extra": extra}):
            found[requirement.name.lower()] = requirement
    return found


def test_the_version_is_written_once():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert 'version = { attr = "stargate.__version__" }' in pyproject
    for path in ("setup.py", "docs/conf.py"):
        text = (ROOT / path).read_text(encoding="utf-8")
        assert stargate.__version__ not in text, f"{path} repeats the version"


def test_the_installed_version_is_the_package_version():
    assert importlib.metadata.version("stargate") == stargate.__version__


def test_setup_py_only_builds_the_c_extension():
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    call = text[text.index("setup(") :]
    assert re.findall(r"^\s+(\w+)=", call, re.M) == ["ext_modules"]


def test_stargate_version_prints_it():
    result = subprocess.run(
        [sys.executable, "-m", "stargate", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"stargate {stargate.__version__}"
    assert result.stderr == ""  # not even eventlet's deprecation notice


def test_a_bsd_licence_ships(metadata):
    assert (
        (ROOT / "LICENSE")
        .read_text(encoding="utf-8")
        .startswith("BSD 3-Clause License")
    )
    assert metadata["License-Expression"] == "BSD-3-Clause"


def test_project_urls_are_given(metadata):
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL") or ())
    assert {"Homepage", "Documentation", "Source", "Changelog"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())


def test_the_testing_extra_is_what_the_helpers_import(metadata):
    testing = requirements(metadata, "testing")
    assert set(testing) == {"websockets", "pytest"}
    # a bounded range: a websockets release that changes the API we use
    # must not reach users before we have tried it
    assert any(s.operator == "<" for s in testing["websockets"].specifier)


def test_the_projects_own_test_needs_stay_out_of_testing(metadata):
    test = requirements(metadata, "test")
    assert "stargate" in test and {"testing"} <= test["stargate"].extras
    for name in ("playwright", "hypothesis", "psutil", "webtest"):
        assert name in test
        assert name not in requirements(metadata, "testing")


def test_the_docs_extra_has_what_autodoc_imports(metadata):
    docs = requirements(metadata, "docs")
    assert "sphinx" in docs
    # autodoc imports stargate.testing (pytest) and stargate.metrics
    assert {"testing", "metrics"} <= docs["stargate"].extras


def test_extras_ci_installs_exist(metadata):
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"test", "bench", "docs", "dev", "testing", "metrics"} <= extras
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    used = re.findall(r"^\s*make_venv \S+ \S+ ([a-z,]+)$", ci, re.M)
    assert used
    for names in used:
        assert set(names.split(",")) <= extras, names


def test_the_package_says_it_is_typed():
    assert (ROOT / "stargate" / "py.typed").exists()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"py.typed"' in pyproject  # in package-data, so wheels carry it


REPOSITORY = "https://github.com/stargate-py/stargate"


def test_the_readme_links_work_on_the_package_index(metadata):
    """The package index renders the README away from the repository: every
    link is absolute, and those into the repository name files that exist."""
    assert f"Source, {REPOSITORY}" in metadata.get_all("Project-URL")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert links
    for link in links:
        assert link.startswith("https://"), f"relative link {link}"
        if link.startswith(REPOSITORY + "/blob/main/"):
            path = link.removeprefix(REPOSITORY + "/blob/main/").split("#")[0]
            assert (ROOT / path).exists(), f"{link} names no file"
