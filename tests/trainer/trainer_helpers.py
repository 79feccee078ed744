"""Moved to tests/support/trainer.py; this old name stays importable (it is that module) for the tests that use it."""

import sys

from tests.support import trainer as _moved

sys.modules[__name__] = _moved
