"""Shared test fixtures: the project root on sys.path and a tiny seeded model."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, GPTConfig  # noqa: E402


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=96, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()
