"""
The language-modelling corpus: the generated tiny-world text by default, or any text file the user passes.

Either way the text is encoded with the shared vocabulary and split 90/10 into train/val by position; batches are
random windows of block_size + 1 tokens, as in nanoGPT. A file that cannot serve (missing, a folder, empty, not
UTF-8 text, characters outside the vocabulary, too short for the block size) is refused with one line naming it.
"""

import os

import torch

from data.tokenizer import check_text, encode
from data.world import generate_corpus


def read_corpus_file(path):
    """The text of a user corpus file, or ValueError saying why it cannot be one."""
    if not os.path.exists(path):
        raise ValueError(f"corpus file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"corpus {path!r} is a folder; pass the path of a text file")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise ValueError(f"corpus file {path!r} is empty")
    if b"\0" in raw:
        raise ValueError(f"corpus file {path!r} is binary (it holds NUL bytes), not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = raw[error.start : error.start + 1]
        raise ValueError(f"corpus file {path!r} is not UTF-8 text (byte {error.start}: {bad!r})") from None
    check_text(text, where=f"corpus file {path!r}")
    return text


def load_corpus(path=None, n_lines=60_000, seed=0, block_size=None):
    """(train_ids, val_ids) as int64 tensors. path=None generates the tiny-world corpus. With block_size, both
    splits must hold more than block_size + 1 tokens."""
    text = generate_corpus(n_lines=n_lines, seed=seed) if path is None else read_corpus_file(path)
    if len(text) < 1000:
        raise ValueError(f"corpus {path or '(generated)'} has {len(text)} characters; at least 1000 are needed")
    ids = torch.tensor(encode(text), dtype=torch.long)
    n_train = int(0.9 * len(ids))
    if block_size is not None and len(ids) - n_train <= block_size + 1:
        raise ValueError(f"corpus {path or '(generated)'} has {len(ids)} characters; its 10% validation split is "
                         f"too short for --block_size={block_size} (it needs at least {10 * (block_size + 2)})")
    return ids[:n_train], ids[n_train:]


def get_batch(ids, batch_size, block_size, generator, device):
    """x, y of shape (batch_size, block_size): random windows of ids and the same windows shifted by one."""
    if len(ids) <= block_size + 1:
        raise ValueError(f"a split of {len(ids)} tokens is too short for block_size {block_size}")
    starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x.to(device), y.to(device)
