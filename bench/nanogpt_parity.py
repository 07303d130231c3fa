"""
Parity with nanoGPT on real text: our GPT and pretraining loop with nanoGPT's CPU "baby" Shakespeare settings.

nanoGPT's settings: 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4,
warmup 100, AdamW betas (0.9, 0.99), weight decay 0.1, dropout 0, no biases (nanoGPT's default), grad clip 1.0,
evaluation every 250 iterations over 20 batches. nanoGPT reaches val loss 1.886 at about 45 ms/iteration on the
2-core CPU machine this project is developed on. Needs ../shared/data/tinyshakespeare.txt (or pass another path
as --corpus).

    python -m bench.nanogpt_parity [--corpus=path/to/tinyshakespeare.txt]   # any other train.py key too
"""

import json
import os
import sys

import cache
import configurator as cfg
import jobs
import train

BABY = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=12", "--max_iters=2000",
        "--lr=1e-3", "--min_lr=1e-4", "--warmup_iters=100", "--beta1=0.9", "--beta2=0.99", "--weight_decay=0.1",
        "--dropout=0", "--bias=false", "--grad_clip=1.0", "--eval_interval=250", "--eval_iters=20", "--device=cpu"]


def default_corpus():
    """../shared/data/tinyshakespeare.txt beside the project's folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "..", "..", "shared", "data", "tinyshakespeare.txt")


def main(argv):
    args = cfg.parse_script_args(argv, cfg.NoOptions, "python -m bench.nanogpt_parity", __doc__)
    if args is None:
        return 0
    argv = BABY + [f"--corpus={default_corpus()}", "--run=shakespeare_baby", "--stage=pretrain"] + args[1]
    config = cfg.parse_args(argv)
    status = train.main(argv)
    if status != 0:
        return status
    with open(os.path.join(config.out_dir, config.run, "pretrain.json")) as f:
        result = json.load(f)
    line = (f"val loss {result['val_loss']:.4f} (nanoGPT: 1.886), {result['ms_per_iter']:.1f} ms/iteration "
            f"(nanoGPT: about 45), {result['seconds']:.0f} s in all")
    print(line)
    cache.save_text(f"`python -m bench.nanogpt_parity {' '.join(args[1])}`: {line}\n\nSample:\n\n```\n"
                    f"{result['samples'][0]}\n```\n", os.path.join(config.out_dir, config.run, "parity.md"))


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
