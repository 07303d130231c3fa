"""
Exercise 1: L2-to-anchor as a plug-in method. One class and one Config field; the loop, the cache key, the report
and the retained-bytes column follow.

    python -m solutions.l2init --preset=tiny --out_dir=scratch --l2init_strength=1000

What you should get (tests/test_solutions.py): two weights moved by 0.5 at strength 3 give a penalty of
3 x (0.25 + 0.25) = 1.5; the run's result holds method_settings {"l2init_strength": ...}; its retained bytes are one
float32 weight vector of the model (4 x 16,864 = 67,456 bytes on the tiny config).
"""

import sys

import jobs
import train
from regularizers import Method, flat_parameters
from solutions import add_method


class L2Init(Method):
    """L2 to the weights at task start: l2init_strength * ||theta - theta_start||^2 (EWC with every w_i = 1)."""

    name = "l2init"
    strength = ("l2init_strength", (1.0, 10.0, 1e2, 1e3, 1e4, 1e5))  # bench/frontier.py's sweep

    def before_task(self, model, split, t):
        self.theta_start = flat_parameters(model).detach().clone()

    def penalty(self, model, batch, outputs):
        drift = flat_parameters(model) - self.theta_start
        return self.config.l2init_strength * drift.pow(2).sum(), {}

    def retained(self):
        return [self.theta_start]


def install():
    add_method(L2Init, __file__, l2init_strength=10.0)


def main(argv):
    install()
    # --jobs=1: a worker process would import regularizers.py afresh and not know the method
    return train.main(["--methods=seqft,l2init"] + argv + ["--jobs=1"])


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
