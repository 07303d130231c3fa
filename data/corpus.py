"""
The language-modelling corpus: the generated tiny-world text by default, or any text file the user passes.

Either way the text is encoded with the shared vocabulary and split 90/10 into train/val by position; batches are
random windows of block_size + 1 tokens, as in nanoGPT.
"""

import os

import torch

from data.tokenizer import check_text, encode
from data.world import generate_corpus


def load_corpus(path=None, n_lines=60_000, seed=0):
    """(train_ids, val_ids) as int64 tensors. path=None generates the tiny-world corpus."""
    if path is None:
        text = generate_corpus(n_lines=n_lines, seed=seed)
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"corpus file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        check_text(text, where=f"corpus file {path!r}")
    if len(text) < 1000:
        raise ValueError(f"corpus {path or '(generated)'} has {len(text)} characters; at least 1000 are needed")
    ids = torch.tensor(encode(text), dtype=torch.long)
    n_train = int(0.9 * len(ids))
    return ids[:n_train], ids[n_train:]


def get_batch(ids, batch_size, block_size, generator, device):
    """x, y of shape (batch_size, block_size): random windows of ids and the same windows shifted by one."""
    if len(ids) <= block_size + 1:
        raise ValueError(f"a split of {len(ids)} tokens is too short for block_size {block_size}")
    starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x.to(device), y.to(device)
