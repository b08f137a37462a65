"""Shared test set-up. Kernel tests run Triton in its CPU interpreter when no GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before any module decorates a @triton.jit kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")
