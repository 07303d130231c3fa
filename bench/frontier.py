"""
Frontiers: each protecting method along its strength, from seqft-like to learning almost nothing, so that the
methods are compared at matched plasticity instead of at one tuned point each.

1. The sweep: every value of every method's strength (its class's `strength`: the config key and its values; a
   method added later joins by declaring one), and seqft, one seed, on the validation split.
2. The matched points: for each level (a fraction of seqft's val plasticity), each method's strength whose val
   plasticity is nearest (matched_points). Chosen on val only.
3. Those points and seqft, over --final_seeds, on the test split: retention at matched plasticity (BWT + 1, and the
   controlled knowledge measures: knowledge = forced choice - its control, content kept@n), mean ± std.

    python -m bench.frontier                                  # full fine-tuning
    python -m bench.frontier --preset=paper --run=paper       # the paper's regime
    python -m bench.frontier --methods=ewc,sae_guided --levels=0.5,0.8 --tasks=...   # any train.py key passes on
    python -m bench.frontier --values=ewc=0.1:1:10                                  # other strength values

Every run is a train.py result cached in its own folder (out/<run>/frontier/<split>/<method>_<key>=<value>/), so an
interrupted frontier resumes. Writes out/<run>/frontier/frontier.md, frontier.json and frontier.png.
"""

import os
import sys
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import cache  # noqa: E402
import configurator as cfg  # noqa: E402
import jobs  # noqa: E402
import sae_stage  # noqa: E402
import train  # noqa: E402
from pretrain import pretrain  # noqa: E402
from regularizers import METHODS  # noqa: E402
from report import fmt, save_figure  # noqa: E402

PROTECTING = tuple(m for m, c in METHODS.items() if c.strength)
REACH = 0.1  # a method whose nearest point is farther from a level's target than this does not reach that level


@dataclass
class Options:
    # bench/frontier.py (any other key is the pipeline's, for every run)
    methods: tuple[str, ...] = PROTECTING  # the methods whose frontier is drawn
    levels: tuple[float, ...] = (0.5, 0.8)  # matched plasticity, as fractions of seqft's val plasticity
    values: tuple[str, ...] = ()  # a method's strength values instead of its class's: method=v1:v2:..., e.g. ewc=1:10
    final_seeds: tuple[int, ...] = (0, 1, 2)  # seeds of the matched points on the test split
    CHOICES = {"methods": PROTECTING}
    AT_LEAST_ZERO = ("final_seeds",)


def matched_points(curves, reference, levels):
    """{level: {method: (value, plasticity)}}: for each level, the point of each method's curve (a list of (strength
    value, plasticity) in the order of its values) whose plasticity is nearest level * reference; a tie keeps the
    first in that order."""
    return {level: {method: min(points, key=lambda point: abs(point[1] - level * reference))
                    for method, points in curves.items()} for level in levels}


def strength_values(items):
    """{method: (value, ...)} from --values items 'method=v1:v2:...'; ValueError names a malformed one."""
    values = {}
    for item in items:
        method, _, text = item.partition("=")
        try:
            values[method] = tuple(float(v) for v in text.split(":"))
        except ValueError:
            raise ValueError(f"--values: {item!r} is not method=v1:v2:... (e.g. ewc=1:10:100)") from None
        if method not in PROTECTING:
            raise ValueError(f"--values: {method!r} has no strength; methods with one: {', '.join(PROTECTING)}")
    return values


def reaches(plasticity, level, reference):
    """Whether a point's val plasticity is within REACH of the level's target, level * reference."""
    return abs(plasticity - level * reference) <= REACH


def run_config(passthrough, method, split, seeds, setting=None):
    """(config, its results folder) of one frontier run: a method at one strength value (or seqft), on a split."""
    key, value = setting or (None, None)
    folder = f"frontier/{split}/{method}" + (f"_{key}={value:g}" if key else "")
    argv = ["--diagnose=false"] + passthrough + [f"--eval_split={split}", f"--methods={method}",
                                                 f"--seeds={','.join(map(str, seeds))}", f"--cl_dir={folder}"]
    argv += [f"--{key}={value}"] if key else []
    return cfg.parse_args(argv), folder


def retention(row):
    """The summary row with retention = BWT + 1 (1: nothing lost, 0: everything)."""
    return {**row, "retention": None if row["bwt"] is None else row["bwt"] + 1,
            "retention_std": row["bwt_std"]}


def main(argv):
    parsed = cfg.parse_script_args(argv, Options, "python -m bench.frontier", __doc__)
    if parsed is None:
        return 0
    options, passthrough = parsed
    base_config = cfg.parse_args(passthrough)
    device = cfg.resolve_device(base_config)
    t0 = time.time()
    sweep = [("seqft", None)]
    for method in options.methods:
        key, values = METHODS[method].strength
        for value in strength_values(options.values).get(method, values):
            try:  # a value the model or regime does not allow (freeze: n_layer blocks under LoRA) is left out
                run_config(passthrough, method, "val", (0,), (key, value))
                sweep.append((method, (key, value)))
            except ValueError as error:
                print(f"frontier: {method} {key}={value} left out ({error})")
    base = pretrain(base_config, device)
    sae_checkpoint = sae_stage.train_sae_stage(base_config, device, base)
    base_seconds = time.time() - t0  # pretraining and the SAEs (reused when train.py has made them)
    # the sweep, and seqft on test (its seeds are needed whatever the sweep finds: they fill the pool's last places);
    # the run folders' own plots are left out (about a second of the main process each; frontier.png draws them all)
    seqft_test = run_config(passthrough, "seqft", "test", options.final_seeds)[0]
    configs = [run_config(passthrough, m, "val", (0,), s)[0] for m, s in sweep]
    summaries = train.continual_learning_many(configs + [seqft_test], device, base, sae_checkpoint,
                                              jobs=base_config.jobs, plots=False)[:-1]  # seqft's test: below
    reference = summaries[0]["seqft"]["plasticity"]
    curves, sweep_rows = {}, {}
    for (method, setting), summary in zip(sweep[1:], summaries[1:]):
        curves.setdefault(method, []).append((setting[1], summary[method]["plasticity"]))
        sweep_rows.setdefault(method, []).append({"value": setting[1], **retention(summary[method])})
    matched = matched_points(curves, reference, options.levels)
    finals = [("seqft", None)] + sorted({(m, (METHODS[m].strength[0], v)) for level, points in matched.items()
                                         for m, (v, p) in points.items() if reaches(p, level, reference)})
    configs = [run_config(passthrough, m, "test", options.final_seeds, s)[0] for m, s in finals]
    summaries = train.continual_learning_many(configs, device, base, sae_checkpoint, jobs=base_config.jobs,
                                              plots=False)
    final_rows = {(m, s[1] if s else None): retention(summary[m]) for (m, s), summary in zip(finals, summaries)}
    out_dir = os.path.join(base_config.out_dir, base_config.run, "frontier")
    columns = [("BWT + 1", "retention"), ("knowledge", "knowledge")]  # retention: the measures drawn and tabled
    if base_config.relearn_steps and base_config.relearn_steps[-1] > 0:
        n = base_config.relearn_steps[-1]
        columns.append((f"content kept@{n}", f"content_kept@{n}"))
    result = {"argv": argv, "seconds": time.time() - t0, "base_seconds": base_seconds,
              "seqft_val_plasticity": reference, "columns": columns,
              "levels": list(options.levels), "sweep": sweep_rows,
              "matched": {str(level): {m: {"value": v, "val_plasticity": p,
                                           **(final_rows[(m, v)] if reaches(p, level, reference) else {})}
                                       for m, (v, p) in points.items()} for level, points in matched.items()},
              "seqft": final_rows[("seqft", None)]}
    cache.save_json(result, os.path.join(out_dir, "frontier.json"))
    text = frontier_table(result)
    cache.save_text(f"Command: `python -m bench.frontier {' '.join(argv)}` ({result['seconds']:.0f} s, of which "
                    f"{base_seconds:.0f} s pretraining and the SAEs)\n\n{text}\n",
                    os.path.join(out_dir, "frontier.md"))
    plot_frontier(result, os.path.join(out_dir, "frontier.png"))
    print(text)


def beyond_spread(a, b, key):
    """'more', 'less' or 'within' for a's key against b's: more or less when the two mean ± std intervals do not
    overlap."""
    if a.get(key) is None or b.get(key) is None:
        return "-"
    gap, spread = a[key] - b[key], (a.get(key + "_std") or 0) + (b.get(key + "_std") or 0)
    return "more" if gap > spread else "less" if gap < -spread else "within"


def frontier_table(result):
    """A table per matched level: each method's strength, plasticity and retention (mean ± std over the final seeds,
    test split), and against SAE-guided at the same level, whether its retention is beyond the seed spread."""
    lines = [f"seqft: val plasticity {result['seqft_val_plasticity']:.3f}; on test, plasticity "
             f"{fmt(result['seqft']['plasticity'], result['seqft']['plasticity_std'])}, BWT + 1 "
             f"{fmt(result['seqft']['retention'], result['seqft']['retention_std'])}"]
    columns = result["columns"]
    for level, rows in result["matched"].items():
        target = float(level) * result["seqft_val_plasticity"]
        lines += ["", f"At {float(level):.0%} of seqft's val plasticity (target {target:.3f}):", "",
                  "| method | strength | val plasticity | plasticity | " + " | ".join(n for n, _ in columns)
                  + " | against sae_guided (" + ", ".join(n for n, _ in columns) + ") |",
                  "|---" * (5 + len(columns)) + "|"]
        guided = rows.get("sae_guided")
        for method, r in rows.items():
            against = (", ".join(beyond_spread(r, guided, k) for _, k in columns)
                       if guided and r is not guided and "plasticity" in r else "-")
            reached = "" if reaches(r["val_plasticity"], float(level), result["seqft_val_plasticity"]) else \
                " (not reached)"
            lines.append(f"| {method} | {r['value']:g} | {r['val_plasticity']:.3f}{reached} | "
                         f"{fmt(r.get('plasticity'), r.get('plasticity_std'))} | "
                         + " | ".join(fmt(r.get(k), r.get(k + "_std")) for _, k in columns) + f" | {against} |")
    lines += ["", "strength: the value of the method's strength key at that point, chosen by its val plasticity (the "
              f"nearest the target; 'not reached': more than {REACH} from it, and not run on test); the other columns "
              "are the test split, mean ± std over the final seeds; 'more' / 'less': beyond both seed spreads, "
              "'within': not"]
    return "\n".join(lines)


def plot_frontier(result, path):
    """One panel per retention measure against plasticity: each method's sweep (val, one seed) as a line, its
    matched points (test, the final seeds) with their spread; seqft's plasticity marked."""
    columns = result["columns"]
    fig, axes = plt.subplots(1, len(columns), figsize=(5.5 * len(columns), 4.5))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(result["sweep"])}
    for ax, (name, key) in zip(axes, columns):
        for method, rows in result["sweep"].items():
            points = [(r["plasticity"], r[key]) for r in rows if r.get(key) is not None and r["plasticity"] is not None]
            ax.plot(*zip(*points), "o-", ms=3, lw=1, alpha=0.5, color=colours[method], label=f"{method} (val sweep)")
        for level, rows in result["matched"].items():
            for method, r in rows.items():
                if r.get(key) is not None:  # a point that reaches its level
                    ax.errorbar(r["plasticity"], r[key], xerr=r["plasticity_std"] or 0, yerr=r.get(key + "_std") or 0,
                                marker="s", ms=6, capsize=3, color=colours[method])
        ax.axvline(result["seqft_val_plasticity"], color="grey", ls=":", lw=1)
        ax.set(xlabel="plasticity (mean R[i][i])", ylabel=name, title=f"{name} against plasticity")
    axes[0].legend(fontsize=7)
    fig.suptitle("frontiers: lines, each method's strength swept (val, one seed); squares, the matched points "
                 "(test, mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
