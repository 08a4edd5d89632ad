"""Shared test set-up.

The whole test session runs torch on one thread: the models under test are tiny, one thread runs them
fastest, and two threads fighting over a shared 2-core machine made small steps 4-10× slower.

Every service the tests start (in process or as a subprocess, which inherits the environment) begins from
a fresh byte-level model unless the test names a base: PEER_BASE_MODEL=fresh here. The default base, the
real SmolLM2, is tested in tests/test_real_base.py and the tests that ask for it. Services serve fp32 weights
(PEER_SERVE_WEIGHTS=float32) unless a test asks for another format: the service tests compare served completions
token for token with an fp32 reference; the formats are tested in tests/test_quantize.py.

Without CUDA, Triton kernels run in Triton's interpreter on CPU (tests/test_kernels.py). TRITON_INTERPRET
is read when ``triton.jit`` builds a kernel, so it is set here, before any test imports one.
"""
import os

import torch

os.environ["PEER_BASE_MODEL"] = "fresh"
os.environ["PEER_SERVE_WEIGHTS"] = "float32"

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
