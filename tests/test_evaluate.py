import json
import math
import os

import pytest
import torch

from data.tasks import (SEPARATOR, answer_format, answer_kind, build_task_suite, concat_splits, format_example,
                        to_tensors)
from data.tokenizer import NEWLINE, decode, encode
from evaluate import (answer_attribution, blind_questions, candidate_scores, choice_candidates, cl_metrics, drift_split,
                      forced_choice, forced_choice_accuracy, forgetting_diagnostic, forgetting_snapshot,
                      format_confusion, greedy_answers, knowledge_metrics, sae_metrics, second_moment_split,
                      task_accuracy)
from model import GPT
from report import base_path, load_cl_results, summarize_run
from sae import SAEConfig, TopKSAE


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


def contexts(idx, attention=None):
    """(row, position, the tokens that position reads, in order) for every position of idx: the row up to it, or,
    where an attention mask is given (model.GPT.forward), the tokens it lets the position attend to. What a
    constructed model conditions on, so that it reads rows packed with a shared prompt as a GPT does."""
    for b, row in enumerate(idx.tolist()):
        for t in range(len(row)):
            reads = range(t + 1) if attention is None else attention[b, t].nonzero().flatten().tolist()
            yield b, t, [row[s] for s in reads]


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

    def forward(self, idx, positions=None, attention=None, head_at=None):
        logits = torch.zeros(idx.size(0), idx.size(1), 96)
        # the line whose prompt starts each row (prompts never share a prefix up to their last character)
        lines = [next(line for prompt, line in self.lines if row[: len(prompt)] == prompt) for row in idx.tolist()]
        for b, t, seen in contexts(idx, attention):
            if seen == lines[b][: len(seen)]:  # only a true prefix is answered as in the line
                logits[b, t, lines[b][len(seen)] if len(seen) < len(lines[b]) else NEWLINE] = 1.0
        return logits if head_at is None else logits[head_at], None, {}  # as GPT.forward's head_at

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


# ----------------------------------------------------------------------------------------------------------------
# forced choice


def test_distractors_are_evaluation_answers_of_the_same_kind_and_differ_from_the_answer_and_each_other():
    suite = build_task_suite(["reverse", "stance", "facts", "close"], n_train=200, n_val=5, n_test=50)
    for task, k in (("reverse", 9), ("stance", 9), ("facts", 9), ("close", 3)):
        split = suite[task]["test"]
        pool = [a for _, a in split.examples]  # the evaluation answers: the correct answer's own pool
        candidates = choice_candidates(split, k)
        for (_, answer), (first, *distractors) in zip(split.examples, candidates):
            assert first == answer and answer not in distractors and len(set(distractors)) == len(distractors)
            assert all(answer_kind(task, d) == answer_kind(task, answer) and d in pool for d in distractors)
            available = len({a for a in pool if answer_kind(task, a) == answer_kind(task, answer)} - {answer})
            assert len(distractors) == min(k, available)
        if task == "stance":  # two answers, 'pos' and 'neg': one distractor each, chance 1/2
            assert all(len(c) == 2 for c in candidates)
        if task == "close":  # every example has a choice now: bracket strings of its length
            assert all(len(c) > 1 for c in candidates)
    assert candidates == choice_candidates(split, 3)  # seeded: the same candidates for every model


class PriorOracle(torch.nn.Module):
    """A question-blind 'model' that knows only how often each answer occurs: after the separator ' > ' it predicts
    each next character by the answers' frequencies given the answer's prefix, p(a) = count(a) / N, whatever the
    question. What a model that forgot the task but kept its answer priors would do."""

    def __init__(self, answers):
        super().__init__()
        self.answers = [a + "\n" for a in answers]
        self.config = type("C", (), {"block_size": 64})()

    def forward(self, idx, positions=None, attention=None, head_at=None):
        logits = torch.full((idx.size(0), idx.size(1), 96), -30.0)
        separator = encode(SEPARATOR)
        for b, t, seen in contexts(idx, attention):
            ends = [s + len(separator) for s in range(len(seen)) if seen[s : s + len(separator)] == separator]
            if not ends:  # still in the question (or padding)
                continue
            prefix = decode(seen[ends[0]:])
            for a in self.answers:
                if a.startswith(prefix) and len(a) > len(prefix):
                    logits[b, t, encode(a[len(prefix)])[0]] = torch.logaddexp(
                        logits[b, t, encode(a[len(prefix)])[0]], torch.tensor(0.0))  # log count
        return logits if head_at is None else logits[head_at], None, {}


def test_candidate_scores_read_each_prompt_once_and_equal_one_row_per_candidate(tiny_model):
    """The shared-prompt rows give a real GPT's scores of each candidate as a row of its own would: the sum of
    log p(completion token | prompt, earlier completion tokens), by hand, one candidate at a time; wherever the
    batches' boundaries between examples fall. A question whose candidates would outgrow the block is named."""
    questions = ["add: 12+7", "add: 3+45", "reverse: abc"]
    candidates = [["19", "91", "20"], ["48", "4"], ["cba", "abc", "bca", "cab"]]
    by_hand = []
    for question, answers in zip(questions, candidates):
        prompt = encode(format_example(question, "")[0])
        for answer in answers:
            completion = encode(format_example(question, answer)[1])
            row = torch.tensor([prompt + completion[:-1]])
            log_probs = torch.log_softmax(tiny_model(row)[0][0].double(), -1)
            by_hand.append(sum(log_probs[len(prompt) - 1 + t, token].item() for t, token in enumerate(completion)))
    for batch_size in (1, 2, 64):
        scores = candidate_scores(tiny_model, questions, candidates, "cpu", batch_size)
        assert scores.shape == (9,) and torch.allclose(scores, torch.tensor(by_hand, dtype=torch.float64), atol=1e-4)
    assert len(set(by_hand)) == 9  # distinct scores: a mix-up of candidates would be seen
    with pytest.raises(ValueError, match="'add: 12\\+7' with its candidates reaches position"):
        candidate_scores(tiny_model, questions, [["1" * 40], ["48"], ["cba"]], "cpu")


def test_a_question_blind_model_scores_forced_choice_above_chance_but_zero_knowledge():
    """The control is what makes the measure: on a skewed task (as count was: mostly '1') a model that knows only
    the answers' frequencies scores forced choice far above chance, and exactly its control."""
    examples = [(f"count a: {w}", a) for w, a in zip(["ab", "ba", "aab", "abc", "cab", "bba", "aaa", "aba", "cca",
                                                        "bca"], "1121112312")]
    split = to_tensors("count", examples, 24)
    candidates, blind = choice_candidates(split, 9), blind_questions(split)
    prior = PriorOracle([a for _, a in examples])
    accuracy, chance = forced_choice_accuracy(prior, split, candidates, "cpu")
    control, _ = forced_choice_accuracy(prior, split, candidates, "cpu", questions=blind)
    assert chance == pytest.approx(1 / 3) and accuracy == pytest.approx(0.6)  # '1' ranked first: 6 of 10
    assert control == accuracy  # knowledge = 0, exactly
    # the memoriser of the evaluation answers reads the question: all of forced choice, little of its control
    accuracy, _ = forced_choice_accuracy(Oracle(split), split, candidates, "cpu")
    control, _ = forced_choice_accuracy(Oracle(split), split, candidates, "cpu", questions=blind)
    assert accuracy == 1.0 and control < 0.2


def test_blind_questions_are_other_examples_with_another_answer():
    split = build_task_suite(["stance"], n_train=20, n_val=5, n_test=40)["stance"]["test"]
    blind = blind_questions(split)
    answer_of = dict(split.examples)
    assert all(b != q and answer_of[b] != a for (q, a), b in zip(split.examples, blind))
    assert blind == blind_questions(split) and blind != blind_questions(split, seed=1)


def test_forced_choice_is_one_for_a_memorised_task_and_about_chance_with_shuffled_answers():
    split = build_task_suite(["reverse"], n_train=200, n_val=5, n_test=200)["reverse"]["test"]
    candidates = choice_candidates(split, 9)
    accuracy, chance = forced_choice_accuracy(Oracle(split), split, candidates, "cpu", batch_size=300)
    assert accuracy == 1.0 and chance == pytest.approx(0.1)  # reverse's answers are many: 9 distractors each
    # the same oracle with the answers shuffled among the questions: it knows answers of the format, not which
    answers = [a for _, a in split.examples]
    shuffled = [answers[i] for i in torch.randperm(len(answers), generator=torch.Generator().manual_seed(0))]
    oracle = Oracle(split, {q: a + "\n" for (q, _), a in zip(split.examples, shuffled)})
    accuracy, _ = forced_choice_accuracy(oracle, split, candidates, "cpu", batch_size=300)
    assert abs(accuracy - chance) < 0.06  # 200 examples: chance 0.1, one standard deviation 0.02


def test_kept_is_relearning_beyond_the_base_models_on_the_earlier_tasks():
    run = {"tasks": ["a", "b", "c"], "R": [[0, 0, 0], [0.2, 0.0, 1.0]], "relearn_steps": [0, 5],
           "relearn": {"a": [0.2, 0.9], "b": [0.0, 0.5]},
           "forced_choice": {"a": {"accuracy": 0.6, "chance": 0.1}, "b": {"accuracy": 0.4, "chance": 0.5},
                             "c": {"accuracy": 1.0, "chance": 0.1}}}
    base = {"tasks": ["a", "b", "c"], "R": [[0, 0, 0]], "relearn_steps": [0, 5],
            "relearn": {"a": [0.0, 0.3], "b": [0.0, 0.1]}}
    m = knowledge_metrics(run, base)
    assert m["exact_match"] == pytest.approx(0.1) and m["forced_choice"] == pytest.approx(0.5)  # tasks a and b
    assert m["forced_choice_chance"] == pytest.approx(0.3)
    run["forced_choice"]["b"] = {"accuracy": 1.0, "chance": 1.0}  # no distractor: no choice, left out
    assert knowledge_metrics(run, base)["forced_choice"] == pytest.approx(0.6)
    assert m["relearn@5"] == pytest.approx(0.7) and m["kept@5"] == pytest.approx(0.7 - 0.2)
    assert m["kept@0"] == pytest.approx(0.1) and "kept@5" not in knowledge_metrics(run, None)
    assert knowledge_metrics({"tasks": ["a"], "R": [[0], [1]]}, None) == {}  # one task: no earlier task


def test_each_knowledge_measure_beside_its_control_by_hand():
    run = {"tasks": ["a", "b", "c"], "R": [[0, 0, 0], [0.2, 0.0, 1.0]], "relearn_steps": [0, 5],
           "constant_guess": {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.25}, "c": {"accuracy": 0.9}},
           "forced_choice": {"a": {"accuracy": 0.6, "control": 0.5, "chance": 0.1},
                             "b": {"accuracy": 0.4, "control": 0.1, "chance": 0.5},
                             "c": {"accuracy": 1.0, "control": 0.0, "chance": 0.1}},
           "relearn": {"a": [0.2, 0.9], "b": [0.0, 0.5]}, "relearn_shuffled": {"a": [0.2, 0.5], "b": [0.0, 0.6]}}
    m = knowledge_metrics(run, None)
    assert m["constant_guess"] == pytest.approx(0.375)  # tasks a and b, each counted once: (0.5 + 0.25) / 2
    assert m["choice_control"] == pytest.approx(0.3) and m["knowledge"] == pytest.approx(0.5 - 0.3)
    assert m["shuffled@5"] == pytest.approx(0.55) and m["content_kept@5"] == pytest.approx(0.7 - 0.55)
    assert m["content_kept@0"] == 0.0  # no step taken: the same model scored twice


def fake_result(method, seed, cl_lr=3e-4, settings=None, step_seconds=0.01):
    shared = {"config": {"cl_lr": cl_lr, "tasks": ["add", "sort"]}, "code": "abc", "torch": "2", "device": "cpu",
              "corpus": "generated", "built_from": {"base": "b1"}}
    return {"method": method, "seed": seed, "tasks": ["add", "sort"], "eval_split": "test",
            "R": [[0, 0], [1, 0], [0.5, 1]], "lm_loss_before": 1.0, "lm_loss_after": 2.0, "retained_bytes": 0,
            "step_seconds": step_seconds, "shared": shared, "method_settings": settings or {}}


def write_results(folder, *results):
    folder.mkdir(parents=True, exist_ok=True)
    for r in results:
        (folder / f"{r['method']}_seed{r['seed']}.json").write_text(json.dumps(r))


def test_load_cl_results_reads_result_files_only(tmp_path):
    write_results(tmp_path / "cl", fake_result("seqft", 0))
    (tmp_path / "cl" / "summary.json").write_text('{"seqft": {"op": 0.5}}')  # written beside results by a rerun
    results = load_cl_results(str(tmp_path))
    assert list(results) == ["seqft"] and results["seqft"][0]["seed"] == 0


def test_a_result_no_method_made_is_named_in_a_warning_never_skipped_in_silence(tmp_path, capsys):
    write_results(tmp_path / "cl", fake_result("seqft", 0), fake_result("sae", 0))  # 'sae': an old name
    (tmp_path / "cl" / "notes.json").write_text("{}")
    results = load_cl_results(str(tmp_path))
    err = capsys.readouterr().err
    assert list(results) == ["seqft"]
    assert "sae_seed0.json" in err and "no method 'sae'" in err and "notes.json is not a result" in err


def test_results_of_different_settings_are_refused_not_averaged(tmp_path):
    write_results(tmp_path / "cl", fake_result("seqft", 0, cl_lr=3e-4), fake_result("seqft", 1, cl_lr=1e-3))
    with pytest.raises(ValueError, match="different settings \\(cl_lr\\).*seqft_seed0.json, seqft_seed1.json"):
        summarize_run(str(tmp_path))
    # a method compared with seqft made at another learning rate: refused too (no step-time ratio across settings)
    write_results(tmp_path / "b" / "cl", fake_result("seqft", 0), fake_result("ewc", 0, cl_lr=1e-3))
    with pytest.raises(ValueError, match="different settings \\(cl_lr\\)"):
        summarize_run(str(tmp_path / "b"))
    write_results(tmp_path / "c" / "cl", fake_result("ewc", 0, settings={"ewc_lambda": 1.0}),
                  fake_result("ewc", 1, settings={"ewc_lambda": 10.0}))
    with pytest.raises(ValueError, match="the ewc results of seeds \\[0, 1\\] .* \\(ewc_lambda\\)"):
        summarize_run(str(tmp_path / "c"))


def test_a_one_task_run_with_the_diagnostic_on_is_summarised_without_curves(tmp_path):
    """After the only task there is no earlier task to diagnose: its diagnostic is [{}] and gets no curves."""
    one = fake_result("seqft", 0) | {"tasks": ["add"], "R": [[0], [1]], "diagnostic": [{}]}
    one["shared"] = one["shared"] | {"config": {"cl_lr": 3e-4, "tasks": ["add"]}}
    write_results(tmp_path / "cl", one)
    summarize_run(str(tmp_path))
    assert "diagnostic" not in json.loads((tmp_path / "summary.json").read_text())["seqft"]


def test_results_of_one_setting_are_averaged_with_the_step_time_ratio(tmp_path):
    write_results(tmp_path / "cl", fake_result("seqft", 0), fake_result("seqft", 1, step_seconds=0.03),
                  fake_result("ewc", 0, settings={"ewc_lambda": 1.0}, step_seconds=0.02),
                  fake_result("ewc", 1, settings={"ewc_lambda": 1.0}, step_seconds=0.03))
    summary = summarize_run(str(tmp_path))
    assert summary["ewc"]["step_time_ratio"] == pytest.approx((2.0 + 1.0) / 2)  # seed by seed
    assert summary["seqft"]["op"] == pytest.approx(0.75) and summary["seqft"]["bwt"] == pytest.approx(-0.5)


def test_report_on_a_missing_empty_or_damaged_folder_is_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty" / "cl").mkdir(parents=True)
    (tmp_path / "damaged" / "cl").mkdir(parents=True)
    (tmp_path / "damaged" / "cl" / "seqft_seed0.json").write_text("{not json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    expected = {"missing": "does not exist", "empty": "holds no continual-learning results",
                "damaged": "seqft_seed0.json is damaged"}
    processes = {state: subprocess.Popen([sys.executable, os.path.join(root, "report.py"), str(tmp_path / state)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for state in expected}  # the three at once: most of each is importing torch
    for state, process in processes.items():
        _, err = process.communicate(timeout=120)
        assert process.returncode == 2 and "Traceback" not in err, state
        assert err.startswith("error: ") and err.count("\n") == 1 and expected[state] in err, state


# ----------------------------------------------------------------------------------------------------------------
# greedy answers and the forgetting diagnostic


def test_greedy_answers_decoded_side_by_side_equal_one_by_one_decoding(tiny_model):
    split = build_task_suite(["translate", "add"], n_train=10, n_val=5, n_test=12)
    mixed = concat_splits([split["translate"]["test"], split["add"]["test"]])
    oracle = Oracle(mixed, {mixed.examples[0][0]: "X\n", mixed.examples[13][0]: "1234567\n"})
    answers = greedy_answers(oracle, mixed, "cpu")
    assert answers[0] == "X" and answers[13] == "1234567"
    assert answers[1:13] == [a for _, a in mixed.examples[1:13]]
    # an untrained model writes anything: side by side must still equal token-by-token decoding, capped alike
    answers = greedy_answers(tiny_model, mixed, "cpu", n_examples=10)
    cap = max(len(a) for _, a in mixed.examples[:10]) + 5
    for (question, answer), got in zip(mixed.examples, answers):
        prompt, _ = format_example(question, answer)
        out = tiny_model.generate(torch.tensor([encode(prompt)]), cap, stop_token=NEWLINE)
        assert got == decode(out[0, len(prompt) :].tolist()).split("\n")[0]


def test_drift_split_adds_up_on_a_hand_made_case():
    z = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])  # two tokens, three features
    z_end = torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    mask = torch.tensor([1.0, 0.0, 0.5])
    # d = mean over tokens |z - z_end| = [0.5, 2.0, 1.0]
    split = drift_split(z, z_end, mask)
    assert split["drift"] == pytest.approx(3.5)
    assert split["drift_mask"] == pytest.approx(0.5 * 1 + 2.0 * 0 + 1.0 * 0.5)
    assert split["drift_rest"] == pytest.approx(0.5 * 0 + 2.0 * 1 + 1.0 * 0.5)
    assert split["drift_mask"] + split["drift_rest"] == pytest.approx(split["drift"])
    assert split["mask_mass"] == pytest.approx(1.5)


def test_format_confusion_counts_answers_in_the_latest_tasks_format_only():
    own, latest = {"aaa"}, {"999", "9999", "aaa"}  # 'aaa' is both tasks' format: not a confusion
    assert format_confusion(["abc", "123", "1234", "12", "xyz"], own, latest) == pytest.approx(2 / 5)


def test_the_diagnostic_is_zero_for_an_unchanged_model_and_moves_with_the_model(tiny_model):
    torch.manual_seed(0)
    split = build_task_suite(["add"], n_train=10, n_val=5, n_test=16)["add"]["test"]
    saes = {p: TopKSAE(SAEConfig(d_in=32, d_sae=64, k=4)) for p in (1, 2)}
    end = forgetting_snapshot(tiny_model, saes, split, "cpu", n_examples=8)
    formats = {answer_format(a) for _, a in split.examples}
    same = forgetting_diagnostic(end, forgetting_snapshot(tiny_model, saes, split, "cpu", 8), formats, {"A"})
    for where in ("tokens", "answers"):
        for point in (p[where] for p in same["points"].values()):
            assert point["drift"] == 0 and point["error_norm_change"] == 0
            assert point["residual"] == point["reconstruction"] == point["error"] == 0
    assert same["answer_kl"] == pytest.approx(0, abs=1e-12)
    with torch.no_grad():
        tiny_model.blocks[0].mlp.c_proj.weight.add_(0.5 * torch.randn_like(tiny_model.blocks[0].mlp.c_proj.weight))
    moved = forgetting_diagnostic(end, forgetting_snapshot(tiny_model, saes, split, "cpu", 8), formats, {"A"})
    for where in ("tokens", "answers"):
        for point in (p[where] for p in moved["points"].values()):
            assert point["drift"] > 0 and point["residual"] > 0
            assert point["drift_mask"] + point["drift_rest"] == pytest.approx(point["drift"], rel=1e-5)
            # the stream's move splits into its two parts, by the triangle inequality
            assert point["residual"] <= point["reconstruction"] + point["error"] + 1e-6
    assert moved["answer_kl"] > 0


def test_second_moment_split_by_hand():
    # tokens (3, 4) and (1, 0): mu = (2, 2), E||x||^2 = (25 + 1) / 2 = 13, ||mu||^2 = 8, E||x - mu||^2 = 5
    split = second_moment_split(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    assert split["rms"] == pytest.approx(13 ** 0.5) and split["mean_share"] == pytest.approx(8 / 13)
    assert split["centered_rms"] == pytest.approx(5 ** 0.5)
    constant = second_moment_split(torch.tensor([[1.0, -2.0]] * 5))
    assert constant["mean_share"] == pytest.approx(1.0) and constant["centered_rms"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# tests that bite: each computes a value by hand that a small, realistic change of the code would move


def test_forgetting_takes_the_best_before_the_final_row_by_hand():
    """forgetting_i = max_{t<T} R[t][i] - R[T][i]: a task that recovers at the end has negative forgetting (the
    final row is not among the rows the max looks at)."""
    R = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.4, 1.0, 0.0], [0.9, 0.2, 1.0]]
    m = cl_metrics(R)
    assert m["forgetting_per_task"] == pytest.approx([0.5 - 0.9, 1.0 - 0.2])
    assert m["forgetting"] == pytest.approx(0.2)


def test_forced_choice_chance_is_the_mean_of_one_over_each_examples_candidates():
    split = to_tensors("count", [("count a: ab", "1"), ("count a: aab", "2")], 24)
    _, chance = forced_choice_accuracy(Oracle(split), split, [["1", "2"], ["2", "1", "3", "4"]], "cpu")
    assert chance == pytest.approx((1 / 2 + 1 / 4) / 2)  # 0.375, not 1 / mean(3) = 0.333


def test_forced_choice_reads_the_evaluation_split_and_wires_its_control():
    """A memoriser of the test split alone: forced choice 1 on test (on another split it could not score at all),
    and its control, the same candidates after another question, far below."""
    suite = build_task_suite(["reverse", "sort"], n_train=50, n_val=5, n_test=40)
    known = concat_splits([suite["reverse"]["test"], suite["sort"]["test"]])
    result = forced_choice(Oracle(known), suite, ["reverse", "sort"], "test", "cpu", k=9)
    for task in ("reverse", "sort"):
        assert result[task]["accuracy"] == 1.0 and result[task]["control"] < 0.2
        assert result[task]["chance"] == pytest.approx(0.1)


def hand_snapshot(codes, mask, log_probs, answers=("12",), x=((3.0, 4.0), (0.0, 1.0)), error=((1.0, 0.0), (0.0, 2.0))):
    """One SAE point; two content tokens, the second of them also the one answer position."""
    x, error = torch.tensor(x), torch.tensor(error)
    return {"points": {1: {"tokens": {"x": x, "error": error, "codes": codes.to_sparse()},
                           "answers": {"x": x[1:], "error": error[1:], "codes": codes[1:].to_sparse()}}},
            "mask": {1: mask}, "answers": list(answers), "log_probs": torch.tensor(log_probs).log()}


def test_forgetting_diagnostic_by_hand_kl_direction_and_the_tasks_own_mask():
    """KL(p_end || p_now), not the reverse; the drift split by the mask of the task's own snapshot (end), not by
    the current one's."""
    end = hand_snapshot(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0]]), torch.tensor([1.0, 0.0, 0.5]),
                        [[0.9, 0.1]])
    now = hand_snapshot(torch.tensor([[0.0, 0.0, 2.0], [0.0, 3.0, 1.0]]), torch.tensor([0.0, 1.0, 0.0]),
                        [[0.5, 0.5]])
    result = forgetting_diagnostic(end, now, {"99"}, {"99"})
    # d = mean over the 2 tokens of |z_now - z_end| = (0.5, 1.5, 0.5); the end mask (1, 0, 0.5)
    point = result["points"][1]["tokens"]
    assert point["drift"] == pytest.approx(2.5)
    assert point["drift_mask"] == pytest.approx(0.5 + 0.25) and point["drift_rest"] == pytest.approx(1.5 + 0.25)
    kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # 0.368; the reverse would be 0.511
    assert result["answer_kl"] == pytest.approx(kl)
    assert point["error_norm_change"] == 0.0 and point["residual"] == 0.0  # the same stream in both snapshots
    # at the answer position (the second token) alone: d = (0, 3, 1), against the end mask
    answers = result["points"][1]["answers"]
    assert answers["drift_mask"] == pytest.approx(0.5) and answers["drift_rest"] == pytest.approx(3.5)


def test_the_stream_s_change_and_its_parts_at_every_token_and_at_the_answers_by_hand():
    codes, mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 0.0])
    end = hand_snapshot(codes, mask, [[0.5, 0.5]], x=((3.0, 4.0), (0.0, 1.0)), error=((1.0, 0.0), (0.0, 2.0)))
    # the answer token moves by (2, 0), all of it in the SAE's error; its reconstruction x - e stays (0, -1)
    now = hand_snapshot(codes, mask, [[0.5, 0.5]], x=((3.0, 4.0), (2.0, 1.0)), error=((1.0, 0.0), (2.0, 2.0)))
    point = forgetting_diagnostic(end, now, {"99"}, {"99"})["points"][1]
    size = (5 + 1) / 2  # mean ||x_end|| over the two tokens
    assert point["tokens"]["residual"] == pytest.approx((0 + 2) / 2 / size)
    assert point["tokens"]["error"] == pytest.approx((0 + 2) / 2 / size) and point["tokens"]["reconstruction"] == 0
    assert point["answers"]["residual"] == pytest.approx(2 / 1) and point["answers"]["reconstruction"] == 0
    assert point["tokens"]["error_norm_end"] == pytest.approx((1 + 2) / 2)
    assert point["tokens"]["error_norm_change"] == pytest.approx((1 + 8 ** 0.5) / 2 - 1.5)
    assert point["tokens"]["drift"] == 0.0  # the codes did not move: only the stream's parts show it


def test_answer_attribution_by_hand_moves_one_part_at_a_time():
    """KL(f(x_end) || f(x_end + part)) for each part of the stream's move, through a hand-made linear head; the
    codes' move decoded by W_dec / c and split by the mask."""
    sae = TopKSAE(SAEConfig(d_in=2, d_sae=3, k=3))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.input_scale.fill_(2.0)
        sae.b_dec.fill_(3.0)  # cancels in the reconstruction's move
    head = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])  # x (2,) -> 3 logits

    def readout(x):
        return x @ head

    def snap(x, error, codes):
        return {"x": torch.tensor([x]), "error": torch.tensor([error]), "codes": torch.tensor([codes]).to_sparse()}

    mask = torch.tensor([1.0, 0.0, 0.5])
    end = snap((1.0, 0.0), (0.5, 0.0), (0.0, 0.0, 0.0))
    # feature 0 (the task's) moves by 2: the reconstruction moves by 2 W_dec[0] / c = (1, 0); the error stays
    now = snap((2.0, 0.0), (0.5, 0.0), (2.0, 0.0, 0.0))
    kls = answer_attribution(readout, sae, now, end, mask)

    def kl(x, y):
        p, q = (torch.softmax(torch.tensor(v, dtype=torch.float64) @ head.double(), -1) for v in (x, y))
        return (p * (p / q).log()).sum().item()

    assert kls["all"] == pytest.approx(kl((1.0, 0.0), (2.0, 0.0)), rel=1e-5) and kls["all"] > 0.1
    assert kls["reconstruction"] == pytest.approx(kls["all"]) and kls["own"] == pytest.approx(kls["all"])
    assert kls["rest"] == 0 and kls["error"] == 0
    # feature 2 (half the task's) moves by 2: the reconstruction by (1, 1), half of it in own and half in rest; the
    # error by (0, -1); the stream by their sum, (1, 0)
    now = snap((2.0, 0.0), (0.5, -1.0), (0.0, 0.0, 2.0))
    kls = answer_attribution(readout, sae, now, end, mask)
    assert kls["own"] == pytest.approx(kl((1.0, 0.0), (1.5, 0.5)), rel=1e-5)
    assert kls["rest"] == pytest.approx(kls["own"])
    assert kls["reconstruction"] == pytest.approx(kl((1.0, 0.0), (2.0, 1.0)), rel=1e-5)
    assert kls["error"] == pytest.approx(kl((1.0, 0.0), (1.0, -1.0)), rel=1e-5)
    assert kls["all"] == pytest.approx(kl((1.0, 0.0), (2.0, 0.0)), rel=1e-5)


def test_the_diagnostic_attributes_at_the_answer_positions_from_end_to_now_with_the_task_s_own_mask():
    """forgetting_diagnostic's wiring of answer_attribution: the answer positions (not every token), the snapshot
    then as the base and the one now as the move, the mask of the task's own snapshot."""
    sae = TopKSAE(SAEConfig(d_in=2, d_sae=3, k=3))
    head = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))

    def readout(x):
        return x @ head

    end = hand_snapshot(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0]]), torch.tensor([1.0, 0.0, 0.5]),
                        [[0.9, 0.1]])
    now = hand_snapshot(torch.tensor([[0.0, 0.0, 2.0], [0.0, 3.0, 1.0]]), torch.tensor([0.0, 1.0, 0.0]),
                        [[0.5, 0.5]], x=((3.0, 4.0), (2.0, -1.0)), error=((1.0, 0.0), (1.0, 1.0)))
    result = forgetting_diagnostic(end, now, {"99"}, {"99"}, readout=(1, sae, readout))
    direct = answer_attribution(readout, sae, now["points"][1]["answers"], end["points"][1]["answers"],
                                end["mask"][1])
    assert result["answer_attribution"] == direct
    assert direct["all"] > 0 and direct["own"] != direct["rest"]
    reversed_ = answer_attribution(readout, sae, end["points"][1]["answers"], now["points"][1]["answers"],
                                   end["mask"][1])
    every_token = answer_attribution(readout, sae, now["points"][1]["tokens"], end["points"][1]["tokens"],
                                     end["mask"][1])
    assert direct != reversed_ and direct != every_token


def test_the_diagnostic_measures_how_much_of_the_mask_the_latest_task_s_covers():
    end = hand_snapshot(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0]]), torch.tensor([1.0, 0.0, 0.5]), [[0.9, 0.1]])
    result = forgetting_diagnostic(end, end, {"99"}, {"99"}, latest_mask={1: torch.tensor([1.0, 1.0, 0.0])})
    assert result["mask_shared"] == {1: pytest.approx((1 * 1 + 0 * 1 + 0.5 * 0) / 1.5)}
    assert "answer_attribution" not in result and "mask_shared" not in forgetting_diagnostic(end, end, {"9"}, {"9"})


def test_compound_ce_increase_splices_every_point_into_the_already_patched_stream(tiny_model):
    """sae_metrics' compound CE increase equals CE(model with every SAE spliced at once, each reading the patched
    stream) - CE(model), recomputed on its windows; splicing each point's reconstruction of the clean stream gives
    another number on this model, so the test tells the two apart."""
    from data.corpus import get_batch

    torch.manual_seed(0)
    saes = {p: TopKSAE(SAEConfig(32, 64, 2)).requires_grad_(False) for p in (1, 2)}
    ids = torch.randint(0, 96, (4000,))
    metrics = sae_metrics(tiny_model, saes, ids, 48, "cpu", n_batches=2, batch_size=4, seed=7)
    generator = torch.Generator().manual_seed(7)
    patched, clean_stream, clean = [], [], []
    for _ in range(2):
        x, y = get_batch(ids, 4, 48, generator, "cpu")
        _, loss, residuals = tiny_model(x, y, read=(1, 2))
        clean.append(loss.item())
        patched.append(tiny_model(x, y, patch=dict(saes))[1].item())
        fixed = {p: (lambda h, r=saes[p].reconstruct(residuals[p])[0]: r) for p in saes}
        clean_stream.append(tiny_model(x, y, patch=fixed)[1].item())
    expected = sum(patched) / 2 - sum(clean) / 2
    assert metrics["compound_ce_increase"] == pytest.approx(expected, abs=1e-6)
    assert abs((sum(clean_stream) / 2 - sum(clean) / 2) - expected) > 1e-4


def test_the_report_sets_each_controlled_measure_against_the_base_model_seed_by_seed(tmp_path):
    """knowledge - base and content kept@n - base are paired by seed: (0.5 - 0.1, 0.3 - 0.2) -> 0.25 ± 0.21."""
    runs, bases = [], []
    for seed, (fc, base_fc) in enumerate([(0.5, 0.1), (0.3, 0.2)]):
        r = fake_result("seqft", seed)
        r.update(relearn_steps=[0, 5], relearn={"add": [0.5, 0.9]}, relearn_shuffled={"add": [0.5, 0.6]},
                 forced_choice={"add": {"accuracy": 0.6 + fc, "control": 0.6, "chance": 0.5}})
        runs.append(r)
        key = {k: v for k, v in r["shared"].items()}
        bases.append({"method": "base", "seed": seed, "tasks": r["tasks"], "R": [[0, 0]], "shared": r["shared"],
                      "key": {**key, "seed": seed}, "relearn_steps": [0, 5], "relearn": {"add": [0.0, 0.3]},
                      "relearn_shuffled": {"add": [0.0, 0.2]},
                      "forced_choice": {"add": {"accuracy": 0.6 + base_fc, "control": 0.6, "chance": 0.5}}})
    write_results(tmp_path / "run" / "cl", *runs)
    for b in bases:
        path = base_path(str(tmp_path / "run"), b["key"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(b, f)
    row = summarize_run(str(tmp_path / "run"))["seqft"]
    assert row["knowledge_vs_base"] == pytest.approx(0.25) and row["knowledge_vs_base_std"] == pytest.approx(
        0.15 * 2**0.5)
    assert row["content_kept@5_vs_base"] == pytest.approx(0.3 - 0.1)  # (0.9 - 0.6) - (0.3 - 0.2), both seeds
    assert row["kept@5"] == pytest.approx(0.9 - 0.3)
