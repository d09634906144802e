"""Shared pytest configuration.

Keep this file small: other test modules may add fixtures below.
"""

import os

import pytest
import torch

# Without a GPU, Triton kernels can only run through the Triton interpreter, which must be
# enabled before any module defining kernels (d2sm_loss.ops.triton_kernels) is imported.
# conftest.py is imported before the test modules, so this is early enough. An explicit
# TRITON_INTERPRET in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def fresh_self_checks(monkeypatch):
    """``d2sm_loss.functional`` with an empty Triton self-check cache, as in a fresh process
    (the cache is restored afterwards)."""
    from d2sm_loss import functional

    monkeypatch.setattr(functional, "_SELF_CHECKS", {})
    return functional
