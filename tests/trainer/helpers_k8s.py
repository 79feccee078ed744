"""Moved to tests/support/k8s.py; this old name stays importable (it is that module) for the tests that use it."""

import sys

from tests.support import k8s as _moved

sys.modules[__name__] = _moved
