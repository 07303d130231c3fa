import pytest
import torch

from data.tasks import build_task_suite, format_example, to_tensors
from data.tokenizer import NEWLINE, decode, encode
from model import GPT
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
    """A causal 'model' that knows each line: at every position it predicts the next character of
    prompt + completion, where the completion is the true answer and newline unless `completions` says otherwise."""

    def __init__(self, split, completions=None):
        super().__init__()
        self.lines = []
        for question, answer in split.examples:
            prompt, completion = format_example(question, answer)
            completion = (completions or {}).get(question, completion)
            self.lines.append((encode(prompt), encode(prompt + completion)))
        self.config = type("C", (), {"block_size": 64})()

    def forward(self, idx):
        logits = torch.zeros(idx.size(0), idx.size(1), 96)
        for b, row in enumerate(idx.tolist()):
            # the line whose prompt starts this row (prompts never share a prefix up to their last character)
            line = next(line for prompt, line in self.lines if row[: len(prompt)] == prompt)
            for t in range(len(row)):
                if row[: t + 1] == line[: t + 1]:  # only a true prefix is answered as in the line
                    logits[b, t, line[t + 1] if t + 1 < len(line) else NEWLINE] = 1.0
        return logits, None, {}

    generate = GPT.generate


def greedy_exact_match(model, split, max_new_tokens=20):
    """The slow reference: decode token by token, compare the text up to the first newline."""
    correct = 0
    for question, answer in split.examples:
        prompt, _ = format_example(question, answer)
        out = model.generate(torch.tensor([encode(prompt)]), max_new_tokens, stop_token=NEWLINE)
        correct += decode(out[0, len(prompt) :].tolist()).split("\n")[0] == answer
    return correct / len(split)


def test_task_accuracy_is_greedy_exact_match():
    split = build_task_suite(["translate"], n_train=10, n_val=5, n_test=20)["translate"]["test"]
    assert len(split) == 20
    assert task_accuracy(Oracle(split), split, "cpu") == 1.0
    qs = [q for q, _ in split.examples]
    answers = dict(split.examples)
    completions = {
        qs[0]: "X" + answers[qs[0]][1:] + "\n",  # wrong first character
        qs[1]: answers[qs[1]][:-1] + "X\n",  # wrong last character
        qs[2]: answers[qs[2]] + "s\n",  # runs on past the answer
        qs[3]: answers[qs[3]][:-1] + "\n",  # stops early
    }
    oracle = Oracle(split, completions)
    assert task_accuracy(oracle, split, "cpu", batch_size=7) == pytest.approx(16 / 20)
    assert greedy_exact_match(oracle, split) == pytest.approx(16 / 20)


def test_long_answers_are_scored_in_full():
    split = to_tensors("translate", [("tr: white banana", "platano blanco")], length=40)  # a 14-character answer
    assert task_accuracy(Oracle(split), split, "cpu") == 1.0
    assert task_accuracy(Oracle(split, {"tr: white banana": "platano blancos\n"}), split, "cpu") == 0.0


def test_load_cl_results_reads_result_files_only(tmp_path):
    from evaluate import load_cl_results

    (tmp_path / "cl").mkdir()
    (tmp_path / "cl" / "seqft_seed0.json").write_text('{"method": "seqft", "seed": 0}')
    (tmp_path / "cl" / "summary.json").write_text('{"seqft": {"op": 0.5}}')  # written beside results by a rerun
    assert dict(load_cl_results(str(tmp_path))) == {"seqft": [{"method": "seqft", "seed": 0}]}
