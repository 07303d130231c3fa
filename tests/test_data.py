import re

import pytest
import torch

from data.corpus import get_batch, load_corpus
from data.instructions import AUX_TASKS, aux_task_names
from data.tasks import (DEFAULT_ORDER, SUITES, TASKS, Batch, answer_format, answer_kind, answers_in_turn,
                        build_task_suite, constant_guess, format_example, make_splits, shuffle_answers, trim_padding)
from data.tokenizer import VOCAB_SIZE, decode, encode
from data.world import COLOURS, LEXICON, THINGS, WORLD, generate_corpus, generate_lines


def test_tokenizer_round_trip():
    text = "mia has a red cat.\nx = f([a]);  ~!"
    assert decode(encode(text)) == text
    assert VOCAB_SIZE == 96


def test_tokenizer_rejects_unknown_characters_and_lists_them():
    with pytest.raises(ValueError) as error:
        encode("caf\u00e9 \u2014 ok\t")
    message = str(error.value)
    assert "'\u00e9'" in message and "'\u2014'" in message and "'\\t'" in message


def test_corpus_is_deterministic_and_in_vocabulary():
    a, b, c = generate_corpus(500, seed=1), generate_corpus(500, seed=1), generate_corpus(500, seed=2)
    assert a == b and a != c
    encode(a)  # no error: every character is in the vocabulary
    assert len(a.splitlines()) == 500


def test_corpus_lines_carry_true_latents():
    for text, latents in generate_lines(300, seed=0):
        if latents["kind"] == "fact":
            assert latents["person"] in text
            fact = WORLD[latents["person"]]
            assert fact["pet"] in text or fact["place"] in text or fact["colour"] in text
        if latents["kind"] == "sum":
            assert text == f"{latents['a']} + {latents['b']} = {latents['a'] + latents['b']}."


def independent_answer(name, question):
    """Each task's answer recomputed from the question text alone, without the generators."""
    body = question.split(": ", 1)[1]
    if name == "stance":
        return "pos" if re.search(r"\b(good|great|lovely|happy|nice|fine|kind|warm)\b", body) else "neg"
    if name == "facts":
        person = next(p for p in WORLD if re.search(rf"\b{p}\b", body))
        key = "colour" if "colour" in body else "place" if ("live" in body or "place" in body) else "pet"
        return WORLD[person][key]
    if name == "add":
        a, b = body.split("+")
        return str(int(a) + int(b))
    if name == "close":
        stack = []
        for ch in body:
            if ch in "([{":
                stack.append(ch)
            elif ch in ")]}":
                stack.pop()
        return "".join({"(": ")", "[": "]", "{": "}"}[c] for c in reversed(stack))
    if name == "reverse":
        return body[::-1]
    if name == "translate":
        adjective, noun = body.split()
        return LEXICON[noun] + " " + LEXICON[adjective]
    if name == "count":
        letter = question.split(":")[0].split()[1]
        return str(body.count(letter))
    if name == "sort":
        return "".join(sorted(body))
    if name.startswith("things"):  # its group's thing, and the colour the world gives it
        thing = re.search(r"the (\w+)", body).group(1)
        return THINGS[int(name[len("things"):]) - 1][thing]
    raise AssertionError(name)


# the knowledge suite's tasks share one generator: its first and last stand for all eight in the tests per task
CHECKED = [name for name in TASKS if not name.startswith("things")] + ["things1", "things8"]


@pytest.mark.parametrize("name", CHECKED)
def test_task_answers_are_correct_and_splits_disjoint(name):
    splits = make_splits(name, n_train=300, n_val=30, n_test=60, seed=0)
    for examples in splits.values():
        for question, answer in examples:
            assert answer == independent_answer(name, question), (question, answer)
    train, val, test = ({q for q, _ in splits[s]} for s in ("train", "val", "test"))
    assert not train & test and not train & val and not val & test
    assert len(splits["train"]) == 300 and len(test) > 0 and len(val) > 0


@pytest.mark.parametrize("name", CHECKED)
def test_tasks_are_deterministic_under_a_seed(name):
    assert make_splits(name, 50, 10, 10, seed=3) == make_splits(name, 50, 10, 10, seed=3)
    assert make_splits(name, 50, 10, 10, seed=3) != make_splits(name, 50, 10, 10, seed=4)


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="valid tasks"):
        make_splits("juggling")


def test_task_tensors_mask_the_answer_only():
    suite = build_task_suite(["add"], n_train=20, n_val=5, n_test=5)
    split = suite["add"]["train"]
    question, answer = split.examples[0]
    prompt, completion = format_example(question, answer)
    assert decode(split.y[0][split.answer_mask[0].bool()]) == completion  # the loss sees exactly the answer + \n
    n_content = len(prompt + completion) - 1
    assert split.content_mask[0].sum().item() == n_content
    assert decode(split.x[0, :n_content]) == (prompt + completion)[:-1]
    assert torch.equal(split.x[0, 1:n_content], split.y[0, : n_content - 1])  # y is x shifted by one


def test_suite_pads_all_tasks_to_one_length():
    suite = build_task_suite(DEFAULT_ORDER, n_train=20, n_val=5, n_test=5)
    lengths = {s.x.size(1) for splits in suite.values() for s in splits.values()}
    assert len(lengths) == 1


def test_user_corpus_file(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("to be or not to be.\n" * 100)
    train, val = load_corpus(str(good))
    assert len(train) == int(0.9 * 2000) and len(train) + len(val) == 2000


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("folder", "is a folder"),
    (b"", "is empty"),
    (b"abc\0def" * 300, "is binary"),
    (b"caf\xe9 au lait\n" * 200, "is not UTF-8 text \\(byte 3"),
    ("na\u00efve\nok caf\u00e9\n" * 200, "'\u00e9' \\(line 2, column 7\\).*'\u00ef' \\(line 1, column 3\\)"),
    ("abc\n" * 100, "has 400 characters; at least 1000"),
    ("abcdefghi\n" * 110, "validation split is too short for --block_size=256"),
])
def test_a_corpus_that_cannot_serve_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_corpus(str(path), block_size=256)


def test_a_task_longer_than_the_block_size_is_named():
    with pytest.raises(ValueError, match="task stance: the example 'mood: .*' needs \\d+ positions, more than "
                                         "--block_size=20"):
        build_task_suite(["add", "stance"], n_train=10, n_val=2, n_test=2, block_size=20)
    build_task_suite(["add", "stance"], n_train=10, n_val=2, n_test=2, block_size=64)  # fits: no error


def test_get_batch_windows():
    ids = torch.arange(1000)
    x, y = get_batch(ids, 4, 16, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)


def test_trim_padding_keeps_the_longest_example_and_changes_no_logit(tiny_model):
    suite = build_task_suite(["add", "stance"], n_train=16, n_val=2, n_test=2)
    short, long = suite["add"]["train"], suite["stance"]["train"]
    fields = ("x", "y", "answer_mask", "content_mask")
    batch = [torch.cat([getattr(short, f)[:3], getattr(long, f)[:1]]) for f in fields]
    x, y, answer_mask, content_mask = trim_padding(Batch(*batch))
    assert x.size(1) == int(batch[3].sum(1).max()) < batch[0].size(1)  # cut to the one stance example's length
    assert answer_mask.sum() == batch[2].sum() and content_mask.sum() == batch[3].sum()  # no real token lost
    with torch.no_grad():  # causal: the cut-off padding never reached a real position
        assert torch.allclose(tiny_model(x)[0], tiny_model(batch[0])[0][:, : x.size(1)], atol=1e-5)


def test_content_tokens_without_the_template_on_a_hand_made_example():
    from data.tasks import to_tensors

    with_template = to_tensors("add", [("add: 23+48", "71")], length=20)
    without = to_tensors("add", [("add: 23+48", "71")], length=20, template_is_content=False)
    # x holds "add: 23+48 > 71" (the newline that ends the answer is only a target)
    assert decode(with_template.x[0, :15]) == "add: 23+48 > 71"
    assert decode(with_template.x[0][with_template.content_mask[0].bool()]) == "add: 23+48 > 71"
    assert decode(without.x[0][without.content_mask[0].bool()]) == "23+4871"  # question and answer, no tag, no ' > '
    assert torch.equal(without.answer_mask, with_template.answer_mask)  # the loss is the same either way
    batch = trim_padding(without.rows(slice(None)))
    assert batch.x.size(1) == 15  # trimming still keeps every real token


# ----------------------------------------------------------------------------------------------------------------
# the auxiliary tasks of the instruction phase


def test_answer_format_is_character_classes():
    assert answer_format("gato rojo") == "aaaa aaaa"
    assert answer_format("#14") == "#99"
    assert answer_format("A.Z.") == "A.A."
    assert answer_format("])") == "])"


def test_no_benchmark_tag_or_answer_format_occurs_in_the_auxiliary_tasks():
    def tag(question):
        return question.split(":")[0]

    benchmark = {name: make_splits(name, 300, 0, 0) for name in TASKS}
    auxiliary = {name: make_splits(name, 300, 0, 32, tasks=AUX_TASKS) for name in AUX_TASKS}
    benchmark_tags = {tag(q) for s in benchmark.values() for q, _ in s["train"]}
    benchmark_formats = {answer_format(a) for s in benchmark.values() for _, a in s["train"]}
    assert {"mood", "q", "add", "close", "rev", "tr", "sort"} <= benchmark_tags  # the check sees real tags
    for name, splits in auxiliary.items():
        lines = [q + " > " + a for split in splits.values() for q, a in split]
        assert {tag(q) for split in splits.values() for q, _ in split} == {name}
        assert name not in benchmark_tags and not name.startswith("count")
        formats = {answer_format(a) for split in splits.values() for _, a in split}
        assert not formats & benchmark_formats, (name, formats & benchmark_formats)
        encode("\n".join(lines))  # every line is in the vocabulary
    assert len(AUX_TASKS) >= 24  # several dozen tags


def test_auxiliary_held_out_prompts_are_not_trained_on():
    splits = make_splits("upper", 500, 0, 32, tasks=AUX_TASKS)
    assert len(splits["test"]) == 32
    assert not {q for q, _ in splits["train"]} & {q for q, _ in splits["test"]}
    assert all(a == q.split(": ")[1].upper() for q, a in splits["test"])


def test_asking_for_more_auxiliary_tags_than_exist_is_an_error():
    assert aux_task_names(0) == ()
    assert aux_task_names(3) == tuple(AUX_TASKS)[:3]
    with pytest.raises(ValueError, match="instruct_tags=99"):
        aux_task_names(99)


@pytest.mark.parametrize("name", CHECKED)
def test_no_task_can_be_answered_by_a_constant(name):
    """On every test split (the benchmark's sizes) the most frequent answer is at most a quarter of it; stance, binary
    by nature, is exactly half each way. count was 94% '1' before this test; facts' answers were a third pets."""
    splits = make_splits(name)
    answers = [a for _, a in splits["test"]]
    top_share = max(answers.count(a) for a in set(answers)) / len(answers)
    if name == "stance":
        assert top_share == 0.5
    else:
        assert top_share <= 0.25, (name, top_share)
    assert len(answers) >= 50  # large enough to read: one example is at most 2 points of accuracy


def test_the_knowledge_suite_shares_one_template_and_format_and_teaches_disjoint_things():
    """--suite=things: every task asks a thing's colour in the same four phrasings and answers a colour; the tasks'
    things are disjoint, and the corpus never mentions one (only the task teaches it)."""
    phrasing = re.compile(r"q: (what colour is the|the|which colour is the) ([a-z]{5})( has what colour| is of what "
                          r"colour)?\?")
    things_of = []
    for name in SUITES["things"]:
        examples = [e for split in make_splits(name, 300, 30, 60).values() for e in split]
        assert all(phrasing.fullmatch(q) and a in COLOURS for q, a in examples)
        things_of.append({phrasing.fullmatch(q).group(2) for q, _ in examples})
    assert all(not a & b for i, a in enumerate(things_of) for b in things_of[i + 1:])
    corpus = generate_corpus(3000)
    assert not any(thing in corpus for group in THINGS for thing in group)


def test_answers_in_turn_and_the_constant_guess_by_hand():
    answer_of = {"q1": "a", "q2": "a", "q3": "a", "q4": "b", "q5": "c"}
    assert answers_in_turn(["q1", "q2", "q4", "q3", "q5"], answer_of) == ["q1", "q4", "q5", "q2", "q3"]
    assert answers_in_turn(["q5", "q4"], answer_of) == ["q5", "q4"]  # all answers different: the order stays
    assert constant_guess(["a", "b", "b", "c"], ["b", "a", "a", "c", "a"]) == ("b", 0.2)  # the training majority
    assert constant_guess(["x", "y"], ["y", "y"]) == ("x", 0.0)  # a tie keeps the first seen


def test_answer_kinds_of_distractors():
    assert answer_kind("facts", "red") == answer_kind("facts", "gray") != answer_kind("facts", "cat")
    assert answer_kind("facts", "park") != answer_kind("facts", "cat")  # 'park' and 'frog': one format, two kinds
    assert answer_kind("close", ")]") == answer_kind("close", "}}") != answer_kind("close", ")")
    assert answer_kind("sort", "123") == answer_kind("add", "456") == "999"


def test_shuffled_answers_keep_the_format_and_frequencies_but_not_the_pairs():
    split = build_task_suite(["count"], n_train=200, n_val=5, n_test=5)["count"]["train"]
    shuffled = shuffle_answers(split, seed=0)
    assert [q for q, _ in shuffled.examples] == [q for q, _ in split.examples]
    assert sorted(a for _, a in shuffled.examples) == sorted(a for _, a in split.examples)
    moved = sum(a != b for (_, a), (_, b) in zip(split.examples, shuffled.examples)) / len(split)
    assert moved > 0.6  # four balanced counts: about 3/4 of the questions get another count
    assert torch.equal(shuffled.answer_mask, split.answer_mask)  # one length, one format: the same positions
    assert shuffled.examples == shuffle_answers(split, seed=0).examples != shuffle_answers(split, seed=1).examples
