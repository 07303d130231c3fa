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
    """Raise ValueError naming every character of `text` that is not in the vocabulary."""
    bad = sorted(set(text) - STOI.keys())
    if bad:
        shown = ", ".join(repr(ch) for ch in bad[:20]) + (", ..." if len(bad) > 20 else "")
        raise ValueError(
            f"{where} has {len(bad)} character(s) outside the vocabulary (newline + printable ASCII): {shown}"
        )


def encode(text):
    check_text(text)
    return [STOI[ch] for ch in text]


def decode(ids):
    return "".join(VOCAB[int(i)] for i in ids)
