import pytest
import torch

from data.tasks import build_task_suite
from evaluate import cl_metrics, task_accuracy


def test_cl_metrics_from_a_hand_written_matrix():
    R = [
        [0.0, 0.0, 0.0],  # before any task
        [0.9, 0.1, 0.0],  # after task 1
        [0.5, 0.8, 0.2],  # after task 2
        [0.3, 0.6, 1.0],  # after task 3
    ]
    m = cl_metrics(R)
    assert m["op"] == pytest.approx((0.3 + 0.6 + 1.0) / 3)
    assert m["plasticity"] == pytest.approx((0.9 + 0.8 + 1.0) / 3)
    assert m["bwt"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)
    assert m["forgetting_per_task"] == pytest.approx([0.9 - 0.3, 0.8 - 0.6])
    assert m["forgetting"] == pytest.approx(0.4)


def test_multitask_matrix_has_only_op():
    m = cl_metrics([[0.0, 0.0, 0.0], [0.9, 0.8, 1.0]])
    assert m["op"] == pytest.approx(0.9) and m["bwt"] is None


class Oracle(torch.nn.Module):
    """A 'model' that knows the answers: it predicts the next character of prompt + answer + newline."""

    def __init__(self, split, wrong=()):
        super().__init__()
        from data.tasks import format_example
        from data.tokenizer import encode

        self.lines = {}
        for question, answer in split.examples:
            prompt, completion = format_example(question, "X" if question in wrong else answer)
            self.lines[tuple(encode(prompt))] = encode(prompt + completion)
        self.config = type("C", (), {"block_size": 64})()

    def forward(self, idx):
        logits = torch.zeros(idx.size(0), idx.size(1), 96)
        for b, row in enumerate(idx.tolist()):
            line = next(v for k, v in self.lines.items() if tuple(row[: len(k)]) == k)
            nxt = line[len(row)] if len(row) < len(line) else 0
            logits[b, -1, nxt] = 1.0
        return logits, None, {}

    from model import GPT
    generate = GPT.generate


def test_task_accuracy_is_exact_match():
    split = build_task_suite(["reverse"], n_train=10, n_val=5, n_test=20)["reverse"]["test"]
    assert len(split) == 20
    assert task_accuracy(Oracle(split), split, "cpu") == 1.0
    wrong = {q for q, _ in split.examples[:5]}
    assert task_accuracy(Oracle(split, wrong), split, "cpu") == pytest.approx(15 / 20)
