"""
Exercise 3: protect the answer format at the earlier tasks' tags, without their data. A tag ('add', 'count a', ...)
is not task data: keep it, and keep what the model writes after it where the answer starts,

    penalty = tag_anchor_lambda * sum over kept tags of KL(p_ref || p_theta) at the last position of '<tag>: > ',

p_ref the model at the start of the current task (a frozen copy, taken once there is a tag to protect).

    python -m solutions.tag_anchor --tag_anchor_lambda=10

What you should get (tests/test_solutions.py): the penalty is 0 right after before_task (the model is its own
reference) and above 0 once the weights move; retained() holds the tags only, 0 bytes of tensors.
"""

import sys

import torch

import jobs
import train
from data.tasks import SEPARATOR
from data.tokenizer import encode
from model import frozen_copy, model_device
from regularizers import Method, distillation_loss
from solutions import add_method


class TagAnchor(Method):
    name = "tag_anchor"

    def __init__(self, config, model, saes=None, seed=0):
        super().__init__(config, model, saes, seed)
        self.tags, self.reference = [], None

    def before_task(self, model, split, t):
        self.reference = frozen_copy(model) if self.tags else None

    def penalty(self, model, batch, outputs):
        if self.reference is None:
            return None, {}
        total = 0.0
        for tag in self.tags:
            prompt = torch.tensor([encode(f"{tag}:{SEPARATOR}")], device=model_device(model))
            with torch.no_grad():
                ref_logits = self.reference(prompt)[0][:, -1:]
            last = torch.ones(1, 1, device=prompt.device)  # the position where the answer's first character is written
            total = total + distillation_loss(model(prompt)[0][:, -1:], ref_logits, last, temperature=1.0)
        return self.config.tag_anchor_lambda * total, {"tag_kl": total.item()}

    def after_task(self, model, split, t):
        self.tags.append(split.examples[0][0].split(": ")[0])
        self.reference = None

    def retained(self):
        return self.tags  # strings: no tensor bytes


def install():
    add_method(TagAnchor, __file__, tag_anchor_lambda=1.0)


def main(argv):
    install()
    return train.main(["--methods=seqft,tag_anchor"] + argv + ["--jobs=1"])  # --jobs=1: see solutions/l2init.py


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
