"""
The analyses behind the paper's thesis, beyond benchmark scores, one module each; `python -m evidence` runs them
(main.py). What they share: a figure is saved laid out.
"""

import matplotlib

matplotlib.use("Agg")

import report  # noqa: E402


def save_figure(fig, path):
    fig.tight_layout()
    report.save_figure(fig, path)
