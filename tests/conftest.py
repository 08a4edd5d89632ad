"""Shared test set-up.

The whole test session runs torch on one thread: the models under test are tiny, one thread runs them
fastest, and two threads fighting over a shared 2-core machine made small steps 4-10× slower.

Without CUDA, Triton kernels run in Triton's interpreter on CPU (tests/test_kernels.py). TRITON_INTERPRET
is read when ``triton.jit`` builds a kernel, so it is set here, before any test imports one.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
