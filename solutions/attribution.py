"""
Exercise 4: causal attribution instead of mean |z| as the mask's statistic. A feature's relevance to a task is how
much the task's answer loss depends on it, not how strongly it fires:

    r_j = mean over content tokens of |z_j * dCE/dz_j|,  then r / max_j r_j,

CE the answer-token cross-entropy of the reference model with the SAE's reconstruction spliced in at its point
(z a leaf with requires_grad, so that dCE/dz exists; the model stays frozen).

    python -m solutions.attribution --preset=tiny --out_dir=scratch

What you should get (tests/test_solutions.py): a feature whose decoder row is zeroed (it fires, but its
reconstruction never reaches the model) gets relevance 0 here, while mean |z| (regularizers.feature_relevance)
keeps its share. main prints how many features each statistic puts above 0.5, on the first task of the run.
"""

import sys

import torch

import configurator as cfg
import jobs
import pretrain
import sae_stage
import train
from model import model_device, model_from_checkpoint
from regularizers import feature_relevance


def attribution_relevance(reference, saes, split, n_examples, batch_size=128):
    """{point: r (d_sae,)} by attribution to the answer loss, each r divided by its max so that r lies in [0, 1]."""
    device, relevance = model_device(reference), {}
    for p, sae in saes.items():
        total, n_tokens = 0.0, 0.0
        for start in range(0, min(n_examples, len(split)), batch_size):
            batch = split.rows(slice(start, min(start + batch_size, n_examples)))
            x, y, answer, content = (t.to(device) for t in batch)
            with torch.no_grad():
                residual = reference(x, read=(p,))[2][p]
            z = sae.encode(residual).detach().requires_grad_(True)  # (B, T, d_sae); encode scales x itself
            ce = reference(x, y, answer, patch={p: sae.decode(z) / sae.input_scale})[1]
            (grad,) = torch.autograd.grad(ce, z)
            total = total + ((z * grad).abs() * content.unsqueeze(-1)).sum((0, 1)).detach()
            n_tokens += content.sum().item()
        r = total / n_tokens
        relevance[p] = r / r.max().clamp(min=1e-12)
    return relevance


def main(argv):
    config = cfg.parse_args(argv)
    base = pretrain.pretrain(config, "cpu")
    model = model_from_checkpoint(base, "cpu").eval()
    saes = sae_stage.load_saes(sae_stage.train_sae_stage(config, "cpu", base), model, "cpu")
    split = train.task_suite(config)[config.tasks[0]]["train"]
    n = config.sae_guided_mask_examples
    for name, r in (("mean |z|", feature_relevance(model, saes, split, n)),
                    ("attribution", attribution_relevance(model, saes, split, n))):
        print(f"{name}: " + ", ".join(f"point {p}: {int((v > 0.5).sum())} features above 0.5, mean {v.mean():.3f}"
                                      for p, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
