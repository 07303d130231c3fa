"""
Exercise 2: a ninth task. `plural` turns a phrase of the world's adjectives and nouns (the phrases `translate`
reads) into its plural: 'pl: red cat' > 'red cats', 'pl: big peach' > 'big peaches' (-es after ch and sh,
-ies for a y after a consonant). 14 x 16
= 224 distinct questions, each answer its own: no constant guess above 1/224.

    python -m solutions.plural --tasks=stance,facts,add,plural --methods=seqft,multitask --eval_split=val

What you should get (tests/test_solutions.py; docs/exercises.md has the run above): every answer follows from its
question by the rule, the three splits share no question, and the task runs through the pipeline on the tiny config.
"""

import sys

import jobs
import train
from data.world import ADJECTIVES, NOUNS
from solutions import add_task


def plural_of(noun):
    if noun.endswith(("ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def plural(rng):
    adjective, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    return f"pl: {adjective} {noun}", f"{adjective} {plural_of(noun)}"


def install():
    add_task("plural", plural, __file__)


def main(argv):
    install()
    return train.main(argv + ["--jobs=1"])  # a worker process would import data/tasks.py afresh, without the task


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
