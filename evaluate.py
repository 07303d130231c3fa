"""
Metrics, plots and the report.

- Task accuracy: exact match of the greedy-decoded answer.
- Continual-learning metrics from the accuracy matrix R, where R[t][i] is the accuracy on task i after training
  task t (row 0: before any task): OP, plasticity, BWT, forgetting.
- SAE metrics on held-out text: L0, FVU, explained variance, dead fraction, cosine(x, xhat), CE increase when a
  reconstruction is spliced into the model, compound CE increase with every point spliced at once.
- Plots (PNG) and a markdown report. `python evaluate.py out/<run>` rebuilds the report from the saved JSON.
"""

import json
import os
import sys
from collections import defaultdict

import torch

from data.tasks import format_example
from data.tokenizer import NEWLINE, decode, encode

# ----------------------------------------------------------------------------------------------------------------
# task accuracy


@torch.no_grad()
def task_accuracy(model, split, device, max_answer_len=12):
    """Exact-match accuracy of greedy decoding on a TaskSplit.

    Prompts of equal length are decoded together as one batch (no padding, so no attention mask is needed)."""
    was_training = model.training
    model.eval()
    by_length = defaultdict(list)
    for question, answer in split.examples:
        prompt, _ = format_example(question, answer)
        by_length[len(prompt)].append((prompt, answer))
    correct = 0
    for group in by_length.values():
        idx = torch.tensor([encode(prompt) for prompt, _ in group], device=device)
        out = model.generate(idx, max_answer_len + 1, stop_token=NEWLINE)[:, idx.size(1) :]
        for row, (_, answer) in zip(out.tolist(), group):
            correct += decode(row).split("\n")[0] == answer
    model.train(was_training)
    return correct / len(split.examples)
