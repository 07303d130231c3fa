"""
Parity with nanoGPT on real text: our GPT and pretraining loop with nanoGPT's CPU "baby" Shakespeare settings.

nanoGPT's settings: 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4,
warmup 100, AdamW betas (0.9, 0.99), weight decay 0.1, dropout 0, no biases (nanoGPT's default), grad clip 1.0,
evaluation every 250 iterations over 20 batches. nanoGPT reaches val loss 1.886 at about 45 ms/iteration on the
2-core CPU machine this project is developed on. Needs ../shared/data/tinyshakespeare.txt (or pass another path
as the first argument).

    python bench/nanogpt_parity.py [path/to/tinyshakespeare.txt]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

BABY = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=12", "--max_iters=2000",
        "--lr=1e-3", "--min_lr=1e-4", "--warmup_iters=100", "--beta1=0.9", "--beta2=0.99", "--weight_decay=0.1",
        "--dropout=0", "--bias=false", "--grad_clip=1.0", "--eval_interval=250", "--eval_iters=20", "--device=cpu"]


def default_corpus():
    """../shared/data/tinyshakespeare.txt beside the project's folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "..", "..", "shared", "data", "tinyshakespeare.txt")


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else default_corpus()
    if not os.path.isfile(path):
        sys.exit(f"no corpus at {path}; pass the path of tinyshakespeare.txt")
    argv = BABY + [f"--corpus={path}", "--run=shakespeare_baby", "--stage=pretrain"]
    assert train.main(argv) == 0
    with open(os.path.join("out", "shakespeare_baby", "pretrain.json")) as f:
        result = json.load(f)
    line = (f"val loss {result['val_loss']:.4f} (nanoGPT: 1.886), {result['ms_per_iter']:.1f} ms/iteration "
            f"(nanoGPT: about 45), {result['seconds']:.0f} s in all")
    print(line)
    with open(os.path.join("out", "shakespeare_baby", "parity.md"), "w") as f:
        f.write(f"`python bench/nanogpt_parity.py`: {line}\n\nSample:\n\n```\n{result['samples'][0]}\n```\n")


if __name__ == "__main__":
    main()
