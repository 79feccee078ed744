"""Moved to tests/support/operator.py; this old name stays importable (it is that module) for the tests that use it."""

import sys

from tests.support import operator as _moved

sys.modules[__name__] = _moved
