"""Moved to tests/support/data.py; this old name stays importable (it is that module) for the tests that use it."""

import sys

from tests.support import data as _moved

sys.modules[__name__] = _moved
