"""
The one character vocabulary shared by every corpus, task, model and SAE: newline plus printable ASCII (96 tokens).

Because the vocabulary never changes, a checkpoint trained on one corpus can always read another, and a text with
characters outside it is rejected up front with the list of offending characters.
"""

VOCAB = ["\n"] + [chr(c) for c in range(32, 127)]  # '\n', ' ', '!', ..., '~'
VOCAB_SIZE = len(VOCAB)  # 96
STOI = {ch: i for i, ch in enumerate(VOCAB)}
NEWLINE = STOI["\n"]


def check_text(text, where="text"):
    """Raise ValueError naming every character of `text` that is not in the vocabulary, each with the line and
    column where it first occurs."""
    bad = sorted(set(text) - STOI.keys())
    if bad:
        shown = ", ".join(f"{ch!r} (line {line}, column {column})" for ch, (line, column) in
                          ((ch, first_position(text, ch)) for ch in bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"{where} has {len(bad)} character(s) outside the vocabulary (newline + printable ASCII): {shown}"
        )


def first_position(text, ch):
    """(line, column), both from 1, of the first occurrence of ch in text."""
    i = text.index(ch)
    return text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1


def encode(text):
    check_text(text)
    return [STOI[ch] for ch in text]


def decode(ids):
    return "".join(VOCAB[int(i)] for i in ids)
