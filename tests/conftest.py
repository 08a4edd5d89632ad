"""Shared test set-up.

The whole test session runs torch on one thread: the models under test are tiny, one thread runs them
fastest, and two threads fighting over a shared 2-core machine made small steps 4-10× slower.
"""
import torch

torch.set_num_threads(1)
