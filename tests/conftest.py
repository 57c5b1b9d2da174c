"""pytest glue for the trial TestCases.

trial runs tests inside `_trial_temp/`, so `TestCase.mktemp()` paths are relative
to that folder. pytest would run them in the checkout instead and litter it;
this moves the session into a scratch directory the same way.
"""

import os
import tempfile

import pytest


@pytest.fixture(autouse=True, scope="session")
def _scratch_cwd():
    before = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="pie-tests-") as scratch:
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(before)
