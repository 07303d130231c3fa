"""
"tiny TRACE": eight prompt -> answer tasks for continual learning, in the spirit of TRACE's mix.

Every example is one line, `"<tag>: <question> > <answer>\n"`. The tag tells the tasks apart in context. Training
uses cross-entropy on the answer tokens only (the answer and its closing newline); the score is exact match of
the greedy-decoded answer. Each task draws from the world of data/world.py, so its skill was seen in pretraining
and a few hundred fine-tuning steps teach the format.

Splits: the distinct prompts of a task are shuffled (seeded), ordered so that their answers come in turn, and cut
into test, val and train pools; the three never share a prompt. `val` is carved from training data, for tuning
hyperparameters without touching `test`. No task can be answered by a constant: on every test split the most
frequent answer is at most a quarter of it, except stance, which is binary by nature and exactly half each way
(a data test checks it; constant_guess is the baseline the report prints beside each task's accuracy).
"""

import random
from dataclasses import dataclass
from typing import NamedTuple

import torch

from data.tokenizer import NEWLINE, encode
from data.world import (ADJECTIVES, COLOURS, NOUNS, PEOPLE, PETS, PLACES, THINGS, carry_free_sum, counted_letters,
                        fact_questions, random_brackets, random_letters, random_mood_sentence, thing_questions,
                        translate)


def stance(rng):
    sentence, mood, _ = random_mood_sentence(rng)
    return f"mood: {sentence}", mood


def facts(rng):
    question, answer = rng.choice(fact_questions(rng.choice(PEOPLE)))
    return f"q: {question}", answer


def add(rng):
    a, b = carry_free_sum(rng)
    return f"add: {a}+{b}", str(a + b)


def close(rng):
    expr, closers = random_brackets(rng)
    return f"close: {expr}", closers


def reverse(rng):
    letters = random_letters(rng)
    return f"rev: {letters}", letters[::-1]


def translation(rng):
    phrase = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return f"tr: {phrase}", translate(phrase)


def count(rng):
    letter, word, n = counted_letters(rng)
    return f"count {letter}: {word}", str(n)


def sort(rng):
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 4)))
    return f"sort: {digits}", "".join(sorted(digits))


def things(group):
    """The knowledge suite's task of one group of things: a question about a thing's colour, in one of four
    phrasings. Every task of the suite has this template and these answers; only the things differ."""
    names = sorted(THINGS[group])

    def generator(rng):
        question, answer = rng.choice(thing_questions(rng.choice(names)))
        return f"q: {question}", answer

    return generator


TASKS = {  # name -> generator(rng) -> (question with its tag, answer)
    "stance": stance, "facts": facts, "add": add, "close": close, "reverse": reverse, "translate": translation,
    "count": count, "sort": sort, **{f"things{g + 1}": things(g) for g in range(len(THINGS))},
}
DEFAULT_ORDER = ("stance", "facts", "add", "close", "reverse", "translate", "count", "sort")
SUITES = {  # --suite=<name>: a named task list. 'things': one template and one answer format, different knowledge
    "eight": DEFAULT_ORDER, "things": tuple(f"things{g + 1}" for g in range(len(THINGS))),
}
SEPARATOR = " > "


def answer_format(answer):
    """The character classes of an answer: a-z -> 'a', A-Z -> 'A', 0-9 -> '9', any other character itself.
    'gato rojo' -> 'aaaa aaaa', '#14' -> '#99'. Two tasks share a format when their answers share these strings."""
    return "".join("a" if c.islower() else "A" if c.isupper() else "9" if c.isdigit() else c for c in answer)


def format_example(question, answer):
    """(prompt, completion): the model reads the prompt and must write the completion."""
    return question + SEPARATOR, answer + "\n"


def answers_in_turn(questions, answer_of):
    """The questions reordered so that their answers come in turn (the first question of each answer, then the
    second of each, ...), each answer's questions in their given order. The splits are cut from the front, so test
    and val hold every answer as evenly as the task allows (stance: exactly half 'pos'); a task whose answers are
    all different keeps its order."""
    by_answer = {}
    for q in questions:
        by_answer.setdefault(answer_of[q], []).append(q)
    rounds = max(len(qs) for qs in by_answer.values())
    return [qs[i] for i in range(rounds) for qs in by_answer.values() if i < len(qs)]


def answer_kind(task, answer):
    """The class of answers a distractor of forced choice is drawn from: for facts the fact asked for (a colour, a
    place or a pet), for close the number of brackets, for the knowledge suite a colour, for every other task the
    answer_format (character classes and length). A wrong answer of another kind would be too easy to reject."""
    if task == "facts":
        return next(kind for kind, values in (("colour", COLOURS), ("place", PLACES), ("pet", PETS))
                    if answer in values)
    if task == "close":
        return f"brackets{len(answer)}"
    if task.startswith("things"):
        return "colour"
    return answer_format(answer)


def constant_guess(train_answers, eval_answers):
    """(answer, accuracy): the most frequent answer of the training split (ties: the first seen), and the exact
    match on the evaluation split of always giving it, the strongest question-blind baseline of exact match."""
    counts = {}
    for a in train_answers:
        counts[a] = counts.get(a, 0) + 1
    answer = max(counts, key=counts.get)
    return answer, sum(a == answer for a in eval_answers) / len(eval_answers)


def make_splits(name, n_train=2000, n_val=100, n_test=200, seed=0, tasks=TASKS):
    """{'train', 'val', 'test'}: lists of (question, answer) with pairwise disjoint questions, from tasks[name]
    (the benchmark's TASKS, or data/instructions.py's AUX_TASKS).

    Small tasks (facts has 90 distinct questions) keep at least half of their questions for training: test and val
    then hold out 25% and 10% of the questions, and train repeats its questions to n_train examples."""
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(tasks)}")
    rng = random.Random(f"{name}-{seed}")
    distinct = {}
    for _ in range(20 * (n_train + n_val + n_test)):
        question, answer = tasks[name](rng)
        distinct[question] = answer
        if len(distinct) >= n_train + n_val + n_test:
            break
    questions = sorted(distinct)
    rng.shuffle(questions)
    questions = answers_in_turn(questions, distinct)
    n = len(questions)
    n_test_q, n_val_q = n_test, n_val
    if n < n_train + n_val + n_test:  # a small universe: hold out 25% / 10% of it at most
        n_test_q, n_val_q = min(n_test, n // 4), min(n_val, n // 10)
    test_q = questions[:n_test_q]
    val_q = questions[n_test_q : n_test_q + n_val_q]
    train_q = questions[n_test_q + n_val_q :]
    if len(train_q) < n_train:  # small task: repeat the training questions
        train_q = [rng.choice(train_q) for _ in range(n_train)]
    return {split: [(q, distinct[q]) for q in qs[:{"train": n_train, "val": n_val, "test": n_test}[split]]]
            for split, qs in (("train", train_q), ("val", val_q), ("test", test_q))}


class Batch(NamedTuple):
    """A batch of examples; every field is (B, T)."""

    x: torch.Tensor  # input tokens
    y: torch.Tensor  # next-token targets
    answer_mask: torch.Tensor  # 1 where the target is a completion token (the loss is taken there)
    content_mask: torch.Tensor  # 1 where the input is a real token (prompt and answer), 0 on padding


@dataclass
class TaskSplit:
    """One split of one task as padded tensors, ready for batching.

    x[i] is the example's tokens, y[i] the same shifted by one (next-token targets), both right-padded to `length`.
    answer_mask marks the targets that belong to the completion (the loss is taken there); content_mask marks the
    input positions that hold real tokens (prompt and answer, no padding)."""

    name: str
    examples: list  # (question, answer) strings, for reading and for checks
    x: torch.Tensor  # (N, length) int64
    y: torch.Tensor  # (N, length) int64
    answer_mask: torch.Tensor  # (N, length) float
    content_mask: torch.Tensor  # (N, length) float

    def __len__(self):
        return len(self.examples)

    def rows(self, idx):
        """The Batch of the examples at idx (a slice or an index tensor), on the CPU."""
        return Batch(self.x[idx], self.y[idx], self.answer_mask[idx], self.content_mask[idx])

    def batch(self, batch_size, generator, device):
        """batch_size examples drawn uniformly with replacement."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        return Batch(*(t.to(device) for t in self.rows(idx)))

    def sample(self, n_examples, seed, device):
        """n_examples drawn without replacement, in an order set by the seed."""
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n_examples]
        return Batch(*(t.to(device) for t in self.rows(idx)))

    def subset(self, idx):
        """A TaskSplit of the examples at the index tensor idx."""
        return TaskSplit(self.name, [self.examples[i] for i in idx.tolist()], *self.rows(idx))


def concat_splits(splits, name="mixed"):
    """One TaskSplit holding the examples of several (all padded to the same length)."""
    return TaskSplit(name, [e for s in splits for e in s.examples],
                     *(torch.cat(tensors) for tensors in zip(*(s.rows(slice(None)) for s in splits))))


def example_lengths(batch):
    """(B,) the number of real positions of each example: one past its last answer position (padding follows)."""
    positions = torch.arange(1, batch.x.size(1) + 1, device=batch.x.device)
    return (batch.answer_mask * positions).amax(1).long()


def trim_padding(batch):
    """Cut the columns that are padding in every row. Exact for a causal model: padding comes after the answer,
    which ends every example, so no real position ever attends to it. Saves the compute of short tasks padded to
    the longest one."""
    length = int(example_lengths(batch).max())
    return Batch(*(t[:, :length] for t in batch))


def example_keys(batch):
    """One key per example, its real tokens as bytes: the same for an example however its padding was trimmed, so
    that what was computed per example of a split can be found again from a batch."""
    x = batch.x.cpu()
    return [x[i, :n].numpy().tobytes() for i, n in enumerate(example_lengths(batch).tolist())]


def to_tensors(name, examples, length, template_is_content=True):
    """Encode (question, answer) pairs into a TaskSplit padded to `length` positions. With template_is_content
    False, content_mask leaves out the task's template: the tag ('add: ') and the separator (' > ')."""
    n = len(examples)
    x = torch.full((n, length), NEWLINE, dtype=torch.long)
    y = torch.full((n, length), NEWLINE, dtype=torch.long)
    answer_mask = torch.zeros(n, length)
    content_mask = torch.zeros(n, length)
    for i, (question, answer) in enumerate(examples):
        prompt, completion = format_example(question, answer)
        ids = encode(prompt + completion)
        if len(ids) - 1 > length:
            raise ValueError(f"task {name}: example {prompt + completion!r} is longer than {length} tokens")
        x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, : len(ids) - 1] = torch.tensor(ids[1:])
        answer_mask[i, len(prompt) - 1 : len(ids) - 1] = 1.0  # targets that are completion tokens
        content_mask[i, : len(ids) - 1] = 1.0
        if not template_is_content:
            tag = question.index(": ") + 2
            content_mask[i, :tag] = 0.0  # the tag
            content_mask[i, len(question) : len(prompt)] = 0.0  # the separator
    return TaskSplit(name, examples, x, y, answer_mask, content_mask)


def shuffle_answers(split, seed):
    """The TaskSplit with its answers permuted among its examples (seeded): every answer still has the task's format
    and the answers keep their frequencies, but a question mostly gets another question's answer. Relearning on it
    restores a task's format without its content: the control of relearning."""
    answers = [a for _, a in split.examples]
    random.Random(seed).shuffle(answers)
    return to_tensors(split.name, [(q, a) for (q, _), a in zip(split.examples, answers)], split.x.size(1))


def build_task_suite(names, n_train=2000, n_val=100, n_test=200, seed=0, length=None, block_size=None,
                     template_is_content=True, tasks=TASKS):
    """{task: {'train'|'val'|'test': TaskSplit}}, all padded to one length so batches of different tasks mix.
    With block_size, an example longer than the model can read is an error that names its task."""
    splits = {name: make_splits(name, n_train, n_val, n_test, seed, tasks) for name in names}
    if length is None:
        length = max(len("".join(format_example(q, a))) - 1
                     for s in splits.values() for exs in s.values() for q, a in exs)
    if block_size is not None and length > block_size:
        name, (q, a) = max(((name, e) for name, s in splits.items() for exs in s.values() for e in exs),
                           key=lambda item: len("".join(format_example(*item[1]))))
        raise ValueError(f"task {name}: the example {''.join(format_example(q, a))!r} needs {length} positions, "
                         f"more than --block_size={block_size}; raise --block_size or leave out --tasks={name}")
    return {name: {split: to_tensors(name, exs, length, template_is_content) for split, exs in s.items()}
            for name, s in splits.items()}
