"""
Exercise 6: close the constant-vector way out of SAE-regularized pretraining. Under the original's form (the joint
reconstruction error / ||x||, --sae_reg_norm=norm) the regularized model can move its residual stream's second
moment into one constant vector, which the joint SAEs' decoder bias reconstructs for free; --sae_reg_norm=var
divides by the token-to-token variance E||x - mu||^2, blind to a constant. This pretrains the same small model
three ways (normal, norm, var) on the generated corpus and prints, at every point, the share of E||x||^2 in the
mean (evaluate.second_moment_split) and the val loss:

    python -m solutions.var_norm                        # 300 steps a model: about 2 min on the 2-core CPU
    python -m solutions.var_norm --max_iters=1000       # any pipeline key

What you should get: docs/exercises.md has this command's numbers; tests/test_solutions.py runs it on the tiny
config. The study-sized run is docs/sae_reg.md's (--preset=gpt_circuits_cpu with the tinyshakespeare corpus).
"""

import sys

import torch

import configurator as cfg
import jobs
from data.corpus import get_batch
from evaluate import second_moment_split
from model import model_from_checkpoint
from pretrain import corpus_of, pretrain

DEFAULTS = ["--n_layer=4", "--n_embd=64", "--block_size=64", "--max_iters=300", "--sae_reg_kind=relu",
            "--sae_reg_l1=0.05", "--sae_reg_expansion=4", "--jobs=1"]


@torch.no_grad()
def mean_shares(model, ids, config, n_windows=64):
    """{point: share of E||x||^2 in the mean} over fixed held-out windows."""
    x, _ = get_batch(ids, n_windows, config.block_size, torch.Generator().manual_seed(0), "cpu")
    residuals = model.eval()(x, read=tuple(range(config.n_layer + 1)))[2]
    return {p: second_moment_split(r.reshape(-1, r.size(-1)))["mean_share"] for p, r in residuals.items()}


def main(argv):
    rows = {}
    for name, keys in (("normal", ["--sae_reg_lambda=0"]), ("norm", ["--sae_reg_lambda=3", "--sae_reg_norm=norm"]),
                       ("var", ["--sae_reg_lambda=3", "--sae_reg_norm=var"])):
        config = cfg.parse_args(DEFAULTS + argv + keys + [f"--run=var_norm_{name}"])
        base = pretrain(config, "cpu")
        rows[name] = (mean_shares(model_from_checkpoint(base, "cpu"), corpus_of(config)[1], config),
                      base["val_loss"])
    for name, (shares, val_loss) in rows.items():
        print(f"{name:>6}: val loss {val_loss:.4f}; share of E||x||^2 in the mean by point: "
              + ", ".join(f"{p}: {s:.2f}" for p, s in shares.items()))
    return 0


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
