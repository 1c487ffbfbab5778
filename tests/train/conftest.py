"""Helpers for trainer tests: tiny VQ runs in subprocesses on a shared built-in shapes cache.

The helpers live in tests/helpers.py (tests/reliability uses them too) and the session fixture
``shapes_cache`` in tests/conftest.py; they are re-exported here for ``from .conftest import``.
"""

from tests.helpers import ROOT, mm_env, run_mm, tiny_vq_overrides  # noqa: F401
