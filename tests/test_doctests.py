"""Every example in a docstring of aha runs and gives what it says (doctest)."""

import doctest
import importlib
import pkgutil

import pytest

import aha

MODULES = sorted(m.name for m in pkgutil.walk_packages(aha.__path__, "aha.") if m.name != "aha.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
