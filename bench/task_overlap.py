"""
How much of each task's evaluation content the pretraining corpus already holds.

The tasks test a new format (`<tag>: question > answer`) for content the corpus teaches in its own phrasing. For
each test (or val) example this writes the question and answer the way a corpus line would phrase them
(data/world.py), and counts the examples whose phrasing occurs as a line of the generated corpus. For stance the
corpus holds the sentence but never its label, and for add the corpus holds only one-digit sums.

    python -m bench.task_overlap                 # the default corpus (60,000 lines, seed 0), the test split
    python -m bench.task_overlap --split=val --corpus_lines=60000 --seed=0
"""

import sys
from dataclasses import dataclass

import configurator as cfg
import jobs
from data.tasks import DEFAULT_ORDER, make_splits
from data.world import generate_corpus


PHRASING = {  # task -> the corpus line that states an example's content (question without its tag, answer, tag)
    "facts": lambda content, answer, tag: f"{content} it is {answer}.",
    "translate": lambda content, answer, tag: f"the {content} is el {answer}.",
    "count": lambda content, answer, tag: f"{content} has {answer} {tag.split()[1]}.",  # tag: 'count a'
    "reverse": lambda content, answer, tag: f"{content} backwards is {answer}.",
    "sort": lambda content, answer, tag: f"{content} in order is {answer}.",
    "close": lambda content, answer, tag: f"x = {content}{answer};",
    "stance": lambda content, answer, tag: content,  # the sentence; its label is never in the corpus
}  # add has none: the corpus sums one-digit numbers only


def corpus_phrasing(task, question, answer):
    """The corpus line that states the example's content, or None where the corpus has no such line."""
    tag, content = question.split(": ", 1)
    return PHRASING[task](content, answer, tag) if task in PHRASING else None


def overlap(split="test", corpus_lines=60_000, seed=0, n_train=2000, n_val=100, n_test=200):
    """{task: (examples whose content is a corpus line, examples)}."""
    lines = set(generate_corpus(corpus_lines, seed).split("\n"))
    shares = {}
    for task in DEFAULT_ORDER:
        examples = make_splits(task, n_train, n_val, n_test)[split]
        seen = sum(corpus_phrasing(task, q, a) in lines for q, a in examples)
        shares[task] = (seen, len(examples))
    return shares


@dataclass
class Options:
    # bench/task_overlap.py (the pipeline's --corpus_lines and --seed make the corpus)
    split: str = "test"  # the split whose examples are counted: test or val
    CHOICES = {"split": ("test", "val")}


def main(argv):
    parsed = cfg.parse_script_args(argv, Options, "python -m bench.task_overlap", __doc__)
    if parsed is None:
        return 0
    options, config = parsed[0], cfg.parse_args(parsed[1])
    args = type("Args", (), {"split": options.split, "corpus_lines": config.corpus_lines, "seed": config.seed})
    shares = overlap(args.split, args.corpus_lines, args.seed)
    print(f"| task | {args.split} examples | content on a corpus line | share |\n|---|---|---|---|")
    for task, (seen, n) in shares.items():
        print(f"| {task} | {n} | {seen} | {seen / n:.0%} |")


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
