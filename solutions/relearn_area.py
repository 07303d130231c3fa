"""
Exercise 5: a longer relearning curve, and one number for "kept" that does not depend on one n: the area between a
method's mean relearning curve and the base model's, by trapezoids over n, divided by the largest n,

    area = (1 / n_max) * sum_k (n_{k+1} - n_k) * (g_k + g_{k+1}) / 2,   g = acc(method) - acc(base) at each n.

    python train.py --methods=seqft,sae_guided --relearn_steps=0,1,2,5,10,20 --forced_choice_k=0 --cl_dir=relearn
    python -m solutions.relearn_area --cl_dir=relearn         # --out_dir, --run, --cl_dir: where the results are

What you should get (tests/test_solutions.py): the area between a curve and itself is 0; the curve 0, 0.5, 1 at
n = 0, 1, 2 against a flat 0 has area 0.5. docs/exercises.md has the default run's curves and areas.
"""

import glob
import json
import os
import sys

import configurator as cfg
import jobs
from report import base_matches


def area_between(steps, curve, base_curve):
    """The mean gap between two curves over [0, max n], by trapezoids (steps increasing)."""
    gap = [a - b for a, b in zip(curve, base_curve)]
    total = sum((n1 - n0) * (g0 + g1) / 2 for n0, n1, g0, g1 in zip(steps, steps[1:], gap, gap[1:]))
    return total / steps[-1]


def mean_curve(result):
    """The mean over the earlier tasks of the relearning curves of one result (train.relearn)."""
    curves = list(result["relearn"].values())
    return [sum(c[i] for c in curves) / len(curves) for i in range(len(result["relearn_steps"]))]


def main(argv):
    config = cfg.parse_args(argv)
    run_dir = os.path.join(config.out_dir, config.run)
    results = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(run_dir, config.cl_dir, "*_seed0.json")))]
    bases = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(run_dir, "base", "seed0_*.json")))]
    for result in results:
        base = next((b for b in bases if base_matches(b, result["shared"])), None)
        if "relearn" not in result or base is None:
            continue
        steps, curve, base_curve = result["relearn_steps"], mean_curve(result), mean_curve(base)
        area = area_between(steps, curve, base_curve)
        print(f"{result['method']}: " + ", ".join(f"{a:.2f}" for a in curve) + f" at n = {steps}; base: "
              + ", ".join(f"{a:.2f}" for a in base_curve) + f"; area above the base {area:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
