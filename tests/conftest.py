"""Shared pytest configuration.

Keep this file small: other test modules may add fixtures below.
"""

import os

import torch

# Without a GPU, Triton kernels can only run through the Triton interpreter, which must be
# enabled before any module defining kernels (d2sm_loss.ops.triton_kernels) is imported.
# conftest.py is imported before the test modules, so this is early enough. An explicit
# TRITON_INTERPRET in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
