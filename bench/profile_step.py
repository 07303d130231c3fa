"""
Where the time of one pretraining step goes, at nanoGPT's CPU "baby" settings (bench/nanogpt_parity.py): a bare
loop of batch, forward, backward, gradient clipping and AdamW, timed part by part, then the operators that take
the most CPU time (torch.profiler). Needs ../shared/data/tinyshakespeare.txt (or pass another path).

    python -m bench.profile_step [--corpus=path/to/tinyshakespeare.txt]
"""

import sys
import time

import torch


import configurator as cfg
import jobs
from bench.nanogpt_parity import BABY, default_corpus
from data.corpus import get_batch
from model import GPT, GPTConfig
from pretrain import corpus_of

WARMUP, STEPS, PROFILED = 30, 200, 30


def main(argv):
    args = cfg.parse_script_args(argv, cfg.NoOptions, "python -m bench.profile_step", __doc__)
    if args is None:
        return 0
    config = cfg.parse_args(BABY + [f"--corpus={default_corpus()}"] + args[1])
    train_ids, _ = corpus_of(config)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, block_size=config.block_size, n_layer=config.n_layer,
                          n_head=config.n_head, n_embd=config.n_embd, bias=config.bias))
    optimizer = model.configure_optimizer(config.lr, config.weight_decay, (config.beta1, config.beta2))
    generator = torch.Generator().manual_seed(0)
    parts = dict.fromkeys(("batch", "forward", "backward", "clip", "AdamW"), 0.0)
    for it in range(WARMUP + STEPS):
        t = [time.perf_counter()]
        x, y = get_batch(train_ids, config.batch_size, config.block_size, generator, "cpu")
        t.append(time.perf_counter())
        _, loss, _ = model(x, y)
        loss.item()
        t.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        t.append(time.perf_counter())
        optimizer.step()
        t.append(time.perf_counter())
        if it >= WARMUP:
            for part, start, end in zip(parts, t, t[1:]):
                parts[part] += end - start
    total = sum(parts.values())
    print(f"bare step: {1000 * total / STEPS:.1f} ms (" + ", ".join(
        f"{part} {1000 * s / STEPS:.1f} ms" for part, s in parts.items()) + f"), mean of {STEPS} steps")
    with torch.profiler.profile() as profiler:
        for _ in range(PROFILED):
            x, y = get_batch(train_ids, config.batch_size, config.block_size, generator, "cpu")
            _, loss, _ = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
