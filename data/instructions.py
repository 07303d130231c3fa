"""
Auxiliary tag-routed tasks: what makes the base model instruction-following before continual learning starts.

The paper's base (Gemma-2 9B-it) already routes on the instruction: the tag of a prompt selects the behaviour and
the answer format. Ours learns that in a short phase after pretraining (train.py, `--instruct_tags`): prompts of
these tasks in the benchmark's `<tag>: question > answer` format, mixed with corpus text. They are disjoint from
the eight benchmark tasks of data/tasks.py by construction:
- no tag is a benchmark tag;
- every answer holds an upper-case letter or a '#', which no benchmark answer does, so no auxiliary answer has
  a benchmark task's answer format (data/tasks.py's `answer_format`, the character classes of an answer; tested);
- none asks for a benchmark skill (facts of the world, mood, sums, brackets, reversal, translation, letter
  counting or sorting); they reuse the world's words only as inputs.
The corpus has no upper-case letters, so the phase also has something new to teach: the tag, not the prompt's
look, must say which of several answers to write for the same input (upper, cap, first, last, dash, ... all read
the same three letters).
"""

import random

from data.world import COLOURS, PEOPLE, PETS, PLACES, random_letters

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WORDS = COLOURS + PETS + PLACES + PEOPLE[:10]  # the first ten people, as the phase was calibrated with


def letters(rng):
    return random_letters(rng, rng.randint(3, 5))


def letter_task(tag, answer_of):
    """A task on random letter strings: '<tag>: abc' -> answer_of('abc')."""
    def generate(rng):
        text = letters(rng)
        return f"{tag}: {text}", answer_of(text)
    return generate


def digit_task(tag, answer_of):
    def generate(rng):
        d = rng.randint(0, 9)
        return f"{tag}: {d}", answer_of(d)
    return generate


def digit_pair_task(tag, answer_of):
    def generate(rng):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{tag}: {a} {b}", answer_of(a, b)
    return generate


def word_pair_task(tag, answer_of, same_half=False):
    """'<tag>: a b' for two world words, distinct unless same_half: then the same word half of the time."""
    def generate(rng):
        a, b = rng.sample(WORDS, 2)
        if same_half and rng.random() < 0.5:
            b = a
        return f"{tag}: {a} {b}", answer_of(a, b)
    return generate


def next_letter(c, step):
    return chr((ord(c) - ord("a") + step) % 26 + ord("a")).upper()


def letter_in(rng):
    text = letters(rng)
    c = rng.choice(text) if rng.random() < 0.5 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"has: {text} {c}", "YES" if c in text else "NO"


def word_list_task(tag, pick):
    def generate(rng):
        words = rng.sample(WORDS, 3)
        return f"{tag}: {' '.join(words)}", pick(words).upper()
    return generate


AUX_TASKS = {  # tag -> generator(rng) -> (question with its tag, answer); the first few are 'a few tags'
    "upper": letter_task("upper", str.upper),
    "first": letter_task("first", lambda s: s[0].upper()),
    "dbl": digit_task("dbl", lambda d: f"#{2 * d}"),
    "parity": digit_task("parity", lambda d: "EVEN" if d % 2 == 0 else "ODD"),
    "join": word_pair_task("join", lambda a, b: f"{a.upper()}-{b.upper()}"),
    "max": digit_pair_task("max", lambda a, b: f"#{max(a, b)}"),
    "len": letter_task("len", lambda s: f"#{len(s)}"),
    "has": letter_in,
    "cap": letter_task("cap", str.capitalize),
    "last": letter_task("last", lambda s: s[-1].upper()),
    "dash": letter_task("dash", lambda s: "-".join(s.upper())),
    "twice": letter_task("twice", lambda s: 2 * s.upper()),
    "swap": letter_task("swap", lambda s: (s[1] + s[0] + s[2:]).upper()),
    "drop": letter_task("drop", lambda s: s[1:].upper()),
    "init": letter_task("init", lambda s: s[:-1].upper()),
    "ends": letter_task("ends", lambda s: f"{s[0]}.{s[-1]}".upper()),
    "plural": letter_task("plural", lambda s: s.upper() + "S"),
    "next": letter_task("next", lambda s: next_letter(s[0], 1)),
    "prev": letter_task("prev", lambda s: next_letter(s[0], -1)),
    "succ": digit_task("succ", lambda d: f"#{d + 1}"),
    "pred": digit_task("pred", lambda d: f"#{d - 1}"),
    "word": digit_task("word", lambda d: DIGIT_WORDS[d].upper()),
    "square": digit_task("square", lambda d: f"#{d * d}"),
    "min": digit_pair_task("min", lambda a, b: f"#{min(a, b)}"),
    "which": digit_pair_task("which", lambda a, b: "LEFT" if a > b else "RIGHT" if b > a else "SAME"),
    "same": word_pair_task("same", lambda a, b: "YES" if a == b else "NO", same_half=True),
    "initials": word_pair_task("initials", lambda a, b: f"{a[0]}.{b[0]}.".upper()),
    "head": word_list_task("head", lambda words: words[0]),
    "tail": word_list_task("tail", lambda words: words[-1]),
    "mid": word_list_task("mid", lambda words: words[1]),
    "num": lambda rng: (lambda d: (f"num: {DIGIT_WORDS[d]}", f"#{d}"))(rng.randint(0, 9)),
    "shout": lambda rng: (lambda w: (f"shout: {w}", w.upper() + "!"))(rng.choice(WORDS)),
}


def aux_task_names(n_tags):
    """The first n_tags auxiliary tasks (0 = none); ValueError if there are not that many."""
    if not 0 <= n_tags <= len(AUX_TASKS):
        raise ValueError(f"--instruct_tags={n_tags}: there are {len(AUX_TASKS)} auxiliary tasks (0 = none)")
    return tuple(AUX_TASKS)[:n_tags]


if __name__ == "__main__":  # a look at every task
    rng = random.Random(0)
    for name, task in AUX_TASKS.items():
        print(" | ".join(f"{q} > {a}" for q, a in (task(rng) for _ in range(3))))
