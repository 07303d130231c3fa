"""
The "tiny world": a small fixed world of people, pets, colours and places, and a generated base corpus about it.

The base corpus plays the role of pretraining data. Each line is about one thing (a fact, a mood, a sum, a sorted
list, brackets, a spelling, a translation), so the model picks up the skills the task suite later asks for and
the SAEs find a dictionary of features. Every line is generated together with its ground-truth latent variables
(`kind` and the values that produced it), so one can ask whether SAE features line up with real concepts.

The world itself (who owns which pet of which colour, who lives where) is fixed by WORLD_SEED and never changes;
the corpus seed only changes which lines are drawn.
"""

import random

WORLD_SEED = 1234

PEOPLE = ["mia", "tom", "ana", "leo", "zoe", "sam", "eva", "max", "ivy", "ben", "jon", "kim", "ali", "amy", "bob",
          "dan", "eli", "fay", "gus", "hal", "ida", "jay", "kay", "lee", "liz", "meg", "ned", "noa", "oli", "pam",
          "ray", "rex", "sal", "ted", "uma", "val", "wes", "yan", "zak", "ada"]
PETS = ["cat", "dog", "bird", "fish", "frog", "duck"]
COLOURS = ["red", "blue", "green", "black", "white", "brown", "pink", "gray"]
PLACES = ["park", "farm", "town", "lake", "hill", "city", "beach", "wood"]
GOOD_WORDS = ["good", "great", "lovely", "happy", "nice", "fine", "kind", "warm"]
BAD_WORDS = ["bad", "awful", "sad", "sick", "cold", "mean", "grim", "rude"]
FRUITS = ["apple", "banana", "lemon", "melon", "cherry", "mango", "grape", "peach", "plum", "pear"]
SIZES = ["big", "small", "old", "young", "fat", "thin"]
# a toy lexicon; translation puts the noun first: "red cat" -> "gato rojo"
LEXICON = {
    "red": "rojo", "blue": "azul", "green": "verde", "black": "negro", "white": "blanco", "brown": "cafe",
    "pink": "rosa", "gray": "gris", "cat": "gato", "dog": "perro", "bird": "ave", "fish": "pez", "frog": "rana",
    "duck": "pato", "big": "gran", "small": "chico", "old": "viejo", "young": "joven", "fat": "gordo",
    "thin": "flaco", "apple": "manzana", "banana": "platano", "lemon": "limon", "melon": "melon", "cherry": "cereza",
    "mango": "mango", "grape": "uva", "peach": "durazno", "plum": "ciruela", "pear": "pera",
}
ADJECTIVES = COLOURS + SIZES  # the first word of a phrase to translate
NOUNS = PETS + FRUITS  # the second
SPELL_WORDS = PETS + COLOURS + PLACES + FRUITS + PEOPLE  # words whose letters the corpus talks about
BRACKETS = {"(": ")", "[": "]", "{": "}"}


def _make_world():
    """Each value of a fact used as evenly as the numbers allow (40 people: every colour and place 5 times, every
    pet 6 or 7 times), so that no answer of the facts task is a good constant guess."""
    rng = random.Random(WORLD_SEED)

    def evenly(values):
        drawn = (values * (len(PEOPLE) // len(values) + 1))[: len(PEOPLE)]
        rng.shuffle(drawn)
        return drawn

    pets, colours, places = evenly(PETS), evenly(COLOURS), evenly(PLACES)
    return {name: {"pet": pet, "colour": colour, "place": place}
            for name, pet, colour, place in zip(PEOPLE, pets, colours, places)}


WORLD = _make_world()  # {person: {"pet": ..., "colour": ..., "place": ...}}

# The things of the knowledge suite (data/tasks.py SUITES["things"]): made-up names the corpus never mentions, each
# with a colour that only the suite's tasks teach; a group of THINGS_PER_GROUP per task, every colour equally often
# in a group, so that the tasks share one template and one answer format and differ only in what they teach.
THING_GROUPS, THINGS_PER_GROUP = 8, 56  # 224 questions a task: 56 in its test split


def _make_things():
    rng = random.Random(WORLD_SEED + 1)
    taken = set(SPELL_WORDS) | set(LEXICON) | set(LEXICON.values()) | set(GOOD_WORDS) | set(BAD_WORDS)
    names = []
    while len(names) < THING_GROUPS * THINGS_PER_GROUP:  # consonant-vowel-consonant-vowel-consonant: 'bakor'
        name = "".join(rng.choice("bdfgklmnprstvz" if i % 2 == 0 else "aeiou") for i in range(5))
        if name not in taken and name not in names:
            names.append(name)
    groups = []
    for g in range(THING_GROUPS):
        colours = (COLOURS * THINGS_PER_GROUP)[:THINGS_PER_GROUP]
        rng.shuffle(colours)
        groups.append(dict(zip(names[g * THINGS_PER_GROUP : (g + 1) * THINGS_PER_GROUP], colours)))
    return groups


THINGS = _make_things()  # [{thing: colour}], one group per task of the knowledge suite


# ----------------------------------------------------------------------------------------------------------------
# small generators shared by the corpus and the task suite (one place for each piece of world logic)

def random_mood_sentence(rng):
    """A one-sentence text with a positive or negative mood word; returns (sentence, 'pos' | 'neg', word)."""
    mood = rng.choice(["pos", "neg"])
    word = rng.choice(GOOD_WORDS if mood == "pos" else BAD_WORDS)
    template = rng.choice(["the {thing} was {w}.", "{name} felt {w}.", "it was a {w} day.", "the {thing} is {w}.",
                           "{name} said the {place} was {w}."])
    sentence = template.format(thing=rng.choice(PETS + FRUITS), name=rng.choice(PEOPLE), place=rng.choice(PLACES),
                               w=word)
    return sentence, mood, word


def random_brackets(rng, max_open=3):
    """An unfinished bracket expression like 'f((a)[b' and the closers it needs, e.g. '])'."""
    n_open = rng.randint(1, max_open)
    text, stack = "f", []
    for _ in range(n_open):
        opener = rng.choice(list(BRACKETS))
        text += opener + rng.choice("abcxyz")
        stack.append(opener)
        if rng.random() < 0.3:  # sometimes a complete group inside
            inner = rng.choice(list(BRACKETS))
            text += inner + rng.choice("abcxyz") + BRACKETS[inner]
    closers = "".join(BRACKETS[o] for o in reversed(stack))
    return text, closers


def random_letters(rng, n=3):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def counted_letters(rng, length=6, max_count=4):
    """(letter, word, count): a random word of `length` letters holding `letter` exactly `count` times, the count
    drawn uniformly from 1..max_count, so that no count is a good constant guess ('count a: bakaxa > 3')."""
    count = rng.randint(1, max_count)
    letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
    others = [c for c in "abcdefghijklmnopqrstuvwxyz" if c != letter]
    word = [rng.choice(others) for _ in range(length)]
    for position in rng.sample(range(length), count):
        word[position] = letter
    return letter, "".join(word), count


def fact_questions(name):
    """Every (question, answer) the world supports about one person: three phrasings of each of three facts."""
    f = WORLD[name]
    return [
        (f"what colour is {name}'s {f['pet']}?", f["colour"]),
        (f"{name}'s {f['pet']} has what colour?", f["colour"]),
        (f"which colour is the {f['pet']} of {name}?", f["colour"]),
        (f"where does {name} live?", f["place"]),
        (f"{name} lives by what?", f["place"]),
        (f"which place is home to {name}?", f["place"]),
        (f"what pet does {name} have?", f["pet"]),
        (f"{name} has what pet?", f["pet"]),
        (f"which pet is {name}'s?", f["pet"]),
    ]


def thing_questions(thing):
    """The four phrasings of the one fact the world holds about a thing of the knowledge suite: its colour."""
    colour = next(group[thing] for group in THINGS if thing in group)
    return [(f"what colour is the {thing}?", colour), (f"the {thing} has what colour?", colour),
            (f"which colour is the {thing}?", colour), (f"the {thing} is of what colour?", colour)]


def carry_free_sum(rng):
    """Two 2-digit numbers whose digits add up without carrying, e.g. (23, 41): each digit of the sum is a
    single-digit sum the corpus teaches."""
    tens = rng.randint(1, 8)
    ones = rng.randint(0, 9)
    a = 10 * tens + ones
    b = 10 * rng.randint(1, 9 - tens) + rng.randint(0, 9 - ones)
    return a, b


def translate(phrase):
    """'red cat' -> 'gato rojo': translate each word, noun first."""
    adjective, noun = phrase.split()
    return f"{LEXICON[noun]} {LEXICON[adjective]}"


# ----------------------------------------------------------------------------------------------------------------
# the base corpus: one function per kind of line, each returning (text, latents)

def fact_line(rng):
    name = rng.choice(PEOPLE)
    f = WORLD[name]
    which = rng.choice(["pet", "colour", "place", "question"])
    text = {
        "pet": f"{name} has a {f['colour']} {f['pet']}.",
        "colour": f"{name}'s {f['pet']} is {f['colour']}.",
        "place": f"{name} lives by the {f['place']}.",
        "question": "{} it is {}.".format(*rng.choice(fact_questions(name))),
    }[which]
    return text, {"kind": "fact", "person": name, **f}


def mood_line(rng):
    sentence, mood, word = random_mood_sentence(rng)
    return sentence, {"kind": "mood", "mood": mood, "word": word}


def sum_line(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} + {b} = {a + b}.", {"kind": "sum", "a": a, "b": b}


def count_line(rng):
    start = rng.randint(0, 5)
    n = rng.randint(3, 5)
    return "counting: " + " ".join(str(i) for i in range(start, start + n)) + ".", {"kind": "count", "start": start}


def letters_line(rng):
    word = rng.choice(SPELL_WORDS)
    which = rng.choice(["spell", "count", "reverse"])
    if which == "spell":
        return f"{word} is spelled {' '.join(word)}.", {"kind": "spell", "word": word}
    if which == "count":
        if rng.random() < 0.5:  # a random word, as the count task asks about
            letter, word, _ = counted_letters(rng)
        else:
            letter = rng.choice(sorted(set(word)))
        return f"{word} has {word.count(letter)} {letter}.", {"kind": "letter_count", "word": word, "letter": letter}
    if rng.random() < 0.5:
        word = random_letters(rng)
    return f"{word} backwards is {word[::-1]}.", {"kind": "reverse", "word": word}


def sort_line(rng):
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 4)))
    return f"{digits} in order is {''.join(sorted(digits))}.", {"kind": "sort", "digits": digits}


def bracket_line(rng):
    expr, closers = random_brackets(rng)
    return f"x = {expr}{closers};", {"kind": "code", "depth": len(closers)}


def lexicon_line(rng):
    if rng.random() < 0.5:
        word = rng.choice(list(LEXICON))
        return f"{word} means {LEXICON[word]}.", {"kind": "lexicon", "word": word}
    phrase = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    return f"the {phrase} is el {translate(phrase)}.", {"kind": "phrase", "phrase": phrase}


def list_line(rng):
    names = rng.sample(PEOPLE, 3)
    return f"{names[0]}, {names[1]} and {names[2]} went to the {rng.choice(PLACES)}.", {"kind": "list"}


LINE_KINDS = {  # generator -> relative frequency in the corpus
    fact_line: 6, mood_line: 2, sum_line: 3, count_line: 1, letters_line: 3, sort_line: 2, bracket_line: 2,
    lexicon_line: 2, list_line: 1,
}


def generate_lines(n_lines, seed=0):
    """n_lines (text, latents) pairs of the base corpus, deterministic given seed."""
    rng = random.Random(seed)
    kinds, weights = list(LINE_KINDS), list(LINE_KINDS.values())
    return [gen(rng) for gen in rng.choices(kinds, weights=weights, k=n_lines)]


def generate_corpus(n_lines=60_000, seed=0):
    """The base corpus as one string, a line per fact."""
    return "\n".join(text for text, _ in generate_lines(n_lines, seed)) + "\n"
