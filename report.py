"""
The report: continual-learning results gathered over seeds into a summary, the printed tables, the plots and
report.md; and the SAE stage's plots. It reads saved JSON only (no model runs here), so it is rebuilt at every run
and an edit of this file redoes no stage.

    python report.py out/<run>          # rebuilds the summary, the plots and report.md from the saved results
"""

import hashlib
import io
import json
import math
import os
import re
import sys
from collections import defaultdict

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import cache
from evaluate import cl_metrics, knowledge_metrics  # noqa: E402
from regularizers import METHODS  # noqa: E402  (the report lists methods in the registry's order)

# ----------------------------------------------------------------------------------------------------------------
# results over seeds


BASE_DIR = "base"  # out/<run>/base/seed<n>_<key hash>.json: the base model relearned and in forced choice, one per
# seed and setting, shared by every results folder of the run (the frontier's many folders among them)


def base_path(run_dir, key):
    """Where the base model's reference with this key (train.base_reference; its key holds the seed) is saved."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(run_dir, BASE_DIR, f"seed{key['seed']}_{digest}.json")


def load_cl_results(run_dir, cl_dir="cl"):
    """{method: [result dict per seed]} from out/<run>/<cl_dir>/<method>_seed<seed>.json, for any method name a
    Python identifier allows. A JSON file there that is not such a result (other than the summary.json written
    beside them), or a result of a method METHODS does not know, is named in a warning, never skipped in silence.
    A missing or empty folder, or a damaged result, is an error that names it."""
    folder = os.path.join(run_dir, cl_dir)
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} does not exist; run `python train.py` first (or give the run's folder)")
    results = defaultdict(list)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(".json") or name == "summary.json":
            continue
        if not re.fullmatch(r"[A-Za-z_]\w*_seed\d+\.json", name):
            print(f"warning: {path} is not a result (<method>_seed<n>.json); left out of the report", file=sys.stderr)
            continue
        try:
            with open(path) as f:
                r = json.load(f)
            problem = result_problem(r) if isinstance(r, dict) else "not a JSON object"
        except (ValueError, UnicodeDecodeError) as error:
            problem = f"{type(error).__name__}: {error}"
        if problem:
            raise ValueError(f"{path} is damaged ({problem}); delete it, or rerun `python train.py` with the same "
                             "options to redo it")
        results[r["method"]].append(r)
    for method in sorted(set(results) - set(METHODS)):
        files = ", ".join(f"{method}_seed{r['seed']}.json" for r in results.pop(method))
        print(f"warning: {files} in {folder}: no method {method!r} in regularizers.METHODS; left out of the report",
              file=sys.stderr)
    if not results:
        raise ValueError(f"{folder} holds no continual-learning results (<method>_seed<n>.json)")
    return results


def result_problem(r):
    """What is wrong with a continual-learning result (a dict read from JSON), or None: the fields the report reads
    must be there, R a matrix of accuracies in [0, 1] (a row per stage, a column per task), losses and times finite
    numbers (a NaN is damage, as the loop never lets a non-finite loss through)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    try:
        if not isinstance(r["method"], str) or not isinstance(r["seed"], int) or not r["tasks"]:
            return "its method, seed or tasks are missing"
        rows, n_tasks = r["R"], len(r["tasks"])
        if not (isinstance(rows, list) and len(rows) >= 2 and all(isinstance(row, list) and len(row) == n_tasks
                                                                    for row in rows)):
            return "R is not a matrix of a row per stage and a column per task"
        if not all(number(v) and 0 <= v <= 1 for row in rows for v in row):
            return "R holds a value that is not an accuracy"
        if not all(number(r[k]) for k in ("lm_loss_before", "lm_loss_after", "step_seconds", "retained_bytes")):
            return "a loss, time or size is not a finite number"
        if not isinstance(r["shared"], dict) or "config" not in r["shared"] or not isinstance(r["method_settings"],
                                                                                              dict):
            return "its shared key or method settings are missing"
    except (KeyError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def base_problem(r):
    """What is wrong with a base model's reference (train.base_reference), or None."""
    if not isinstance(r, dict) or not isinstance(r.get("seed"), int) or not isinstance(r.get("shared"), dict):
        return "its seed or shared key is missing"
    if not isinstance(r.get("tasks"), list) or not isinstance(r.get("R"), list):
        return "its tasks or R are missing"
    if any(k in r and not (isinstance(r[k], dict) and isinstance(r.get("relearn_steps"), list))
           for k in ("relearn", "relearn_shuffled")):
        return "its relearning curves are damaged"
    return None


def load_base_results(run_dir):
    """[result] of the base model's relearning and forced choice in a run's folder (train.base_reference), for
    every setting and seed made there; [] if there are none. A damaged one is named and left out."""
    folder = os.path.join(run_dir, BASE_DIR)
    results = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if re.fullmatch(r"seed\d+_[0-9a-f]+\.json", name):
            path = os.path.join(folder, name)
            try:
                with open(path) as f:
                    r = json.load(f)
                problem = base_problem(r)
            except (ValueError, UnicodeDecodeError) as error:
                problem = f"{type(error).__name__}: {error}"
            if problem:
                print(f"warning: {path} is damaged ({problem}); left out (rerun train.py to redo it)", file=sys.stderr)
                continue
            results.append(r)
    return results


def base_matches(b, shared):
    """Whether a base model's reference was made for the runs whose shared key is `shared`: the same code, torch,
    device, corpus and base model, and the same value of every config field its own key holds (a subset of the
    runs' fields: the base reference does not depend on the diagnostic's)."""
    key = b.get("key") or {}
    return (isinstance(key.get("config"), dict) and all(key.get(part) == shared.get(part) for part in
                                                        ("code", "torch", "device", "corpus", "built_from"))
            and all(shared["config"].get(k) == v for k, v in key["config"].items()))


def differing_keys(dicts):
    """The keys whose values are not the same in all of dicts."""
    return sorted(k for k in set().union(*dicts) if len({json.dumps(d.get(k), sort_keys=True) for d in dicts}) > 1)


def check_comparable(results):
    """Refuse to average or set side by side results made by different settings: all runs must share the
    continual-learning settings, code, device and base model (their 'shared' key), and the seeds of one method
    its own settings. The error names the keys that differ."""
    runs = [r for rs in results.values() for r in rs]
    # the shared config fields, and beside them the code, torch, device, corpus and base-model hashes
    shared = [{**r["shared"]["config"], **{k: v for k, v in r["shared"].items() if k != "config"}} for r in runs]
    differing = differing_keys(shared)
    if differing:
        files = ", ".join(f"{r['method']}_seed{r['seed']}.json" for r in runs)
        raise ValueError(f"these results were made with different settings ({', '.join(differing)}), so they are "
                         f"not compared: {files}; keep one setting per folder (--cl_dir)")
    for method, rs in results.items():
        differing = differing_keys([r["method_settings"] for r in rs])
        if differing:
            raise ValueError(f"the {method} results of seeds {[r['seed'] for r in rs]} were made with different "
                             f"settings ({', '.join(differing)}), so they are not averaged; keep one setting per "
                             "folder (--cl_dir)")


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def summarize_run(run_dir, methods=None, seeds=None, cl_dir="cl", plots=True):
    """Aggregate the CL results over seeds, print the comparison table, write summary.json, report.md, plots
    (into out/<run>/, or out/<run>/<cl_dir>/ for another results folder; plots=False: no plots)."""
    results = load_cl_results(run_dir, cl_dir)
    results = {m: [r for r in results[m] if seeds is None or r["seed"] in seeds]
               for m in METHODS if m in results and (methods is None or m in methods)}
    results = {m: rs for m, rs in results.items() if rs}
    if not results:
        raise ValueError(f"no continual-learning results for methods {methods} and seeds {seeds} in "
                         f"{os.path.join(run_dir, cl_dir)}")
    check_comparable(results)
    shared = next(iter(results.values()))[0]["shared"]  # a base reference of other settings is a stale one
    base = {b["seed"]: b for b in load_base_results(run_dir) if base_matches(b, shared)}
    if cl_dir != "cl":
        run_dir = os.path.join(run_dir, cl_dir)
    seqft_step = {r["seed"]: r["step_seconds"] for r in results.get("seqft", [])}
    summary = {}
    for method, runs in results.items():
        per_seed = [cl_metrics(r["R"]) | knowledge_metrics(r, base.get(r["seed"])) for r in runs]
        row = {"seeds": [r["seed"] for r in runs], "tasks": runs[0]["tasks"], "eval_split": runs[0]["eval_split"]}
        for key in ("op", "bwt", "plasticity", "forgetting"):
            row[key], row[key + "_std"] = mean_std([m[key] for m in per_seed])
        knowledge = {key for m in per_seed for key in m if key not in ("op", "bwt", "plasticity", "forgetting",
                                                                       "forgetting_per_task")}
        for key in sorted(knowledge):  # kept@n only where every seed has its base result
            if all(key in m for m in per_seed):
                row[key], row[key + "_std"] = mean_std([m[key] for m in per_seed])
        base_runs = [base[r["seed"]] for r in runs if r["seed"] in base]
        if base_runs and len(base_runs) == len(runs):  # the base model, on the same seeds: the reference row
            base_metrics = [knowledge_metrics(b, None) for b in base_runs]
            row["base"] = {key: mean_std([m[key] for m in base_metrics])[0] for key in base_metrics[0]}
            # beyond the base model, seed by seed: a method's controlled measure minus the base's of the same seed
            for key in [k for k in base_metrics[0] if k == "knowledge" or k.startswith("content_kept@")]:
                if all(key in m for m in per_seed):
                    row[key + "_vs_base"], row[key + "_vs_base_std"] = mean_std(
                        [m[key] - b[key] for m, b in zip(per_seed, base_metrics)])
        row["lm_loss_before"], _ = mean_std([r["lm_loss_before"] for r in runs])
        row["lm_loss_after"], row["lm_loss_after_std"] = mean_std([r["lm_loss_after"] for r in runs])
        row["retained_bytes"], _ = mean_std([r["retained_bytes"] for r in runs])
        row["step_ms"], _ = mean_std([1000 * r["step_seconds"] for r in runs])
        # step-time ratio against seqft of the same seed (all runs here share their settings, checked above)
        ratios = [r["step_seconds"] / seqft_step[r["seed"]] for r in runs if r["seed"] in seqft_step]
        row["step_time_ratio"], _ = mean_std(ratios)
        row["R_mean"] = torch.tensor([r["R"] for r in runs], dtype=torch.float64).mean(0).tolist()
        if all(r.get("forced_choice") for r in runs):  # knowledge per task: where the model still reads the question
            row["knowledge_per_task"] = {t: mean_std([r["forced_choice"][t]["accuracy"] - r["forced_choice"][t].get(
                "control", 0.0) for r in runs])[0] for t in runs[0]["forced_choice"]}
        if "constant_guess" in runs[0]:  # a property of the data: the same for every seed
            row["constant_guess_per_task"] = runs[0]["constant_guess"]
        if all(r.get("aux_accuracy") for r in runs):  # an instruction-following base: the tags along the sequence
            row["aux_accuracy"] = torch.tensor([r["aux_accuracy"] for r in runs]).mean(0).tolist()
        if all(len(r.get("diagnostic", [])) > 1 for r in runs):  # a diagnostic needs a task learned before
            row["diagnostic"] = diagnostic_curves(runs)
        summary[method] = row
    cache.save_json(summary, os.path.join(run_dir, "summary.json"))
    table = results_table(summary)
    print(table)
    if plots and DRAW_PLOTS:
        plot_cl(summary, run_dir)
        plot_forgetting(summary, run_dir)
        plot_knowledge(summary, run_dir)
    write_report(summary, table, run_dir)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# tables


def fmt(mean, std=None, digits=3):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def relearn_steps(summary):
    """The n of relearn@n in a summary, in order (0 included: the final model's own accuracy)."""
    return sorted({int(match[1]) for row in summary.values() for key in row
                   if (match := re.fullmatch(r"relearn@(\d+)", key))})


KEPT_COLUMNS = (("exact match", "exact_match"), ("forced choice", "forced_choice"), ("control", "choice_control"),
                ("knowledge", "knowledge"))


def results_table(summary):
    """Three markdown tables: what is kept of the earlier tasks (each measure beside its control: exact match beside
    the constant guess, forced choice beside its question-blind control, relearning beside the base model and
    beside relearning on shuffled answers), what it costs, and per task the constant guess beside R[i][i]."""
    steps = [n for n in relearn_steps(summary) if n > 0]  # relearn@0 is the exact match on the earlier tasks
    relearn_keys = [(f"{name}@{n}", f"{key}@{n}") for n in steps
                    for name, key in (("relearn", "relearn"), ("kept", "kept"), ("content kept", "content_kept"))]
    columns = [("OP", "op"), ("BWT", "bwt")] + list(KEPT_COLUMNS) + relearn_keys
    columns = [(name, key) for name, key in columns  # a measure no run made (switched off) has no column
               if key in ("op", "bwt") or any(key in r for r in summary.values())]
    lines = ["| method | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, r in summary.items():
        lines.append(f"| {method} | " + " | ".join(fmt(r.get(key), r.get(key + "_std")) for _, key in columns) + " |")
    base = next((r["base"] for r in summary.values() if "base" in r), None)
    if base:  # the base model, never trained on the tasks: what each measure gives without them
        cells = ["0" if key.startswith("kept@") else fmt(base.get(key)) for _, key in columns]
        lines.append("| *base model* | " + " | ".join(cells) + " |")
    guess = next((r for r in summary.values() if "constant_guess" in r), None)
    if guess:  # always the task's most frequent training answer: exact match's strongest trivial baseline
        per_task = guess["constant_guess_per_task"]
        cells = {"op": fmt(sum(v["accuracy"] for v in per_task.values()) / len(per_task)),
                 "exact_match": fmt(guess["constant_guess"])}
        lines.append("| *constant guess* | " + " | ".join(cells.get(key, "-") for _, key in columns) + " |")
    first = next(iter(summary.values()))
    chance = first.get("forced_choice_chance")
    notes = ["every column but OP is a mean over the earlier tasks (all but the last), each task counted once "
             "whatever its size", "exact match: greedy answer right; *constant guess*: always the task's most "
             "frequent training answer"]
    if chance is not None:
        notes.append(f"forced choice: share of examples whose correct answer outranks distractors of the same kind "
                     f"from the task's evaluation answers (chance {chance:.3f}); control: the same candidates after "
                     f"another example's question; knowledge = forced choice - control")
    if steps:
        notes += ["relearn@n: accuracy after n steps of fine-tuning on each task alone, from the final model; "
                  "kept@n: relearn@n minus the base model's (same steps, batches, seed)",
                  "content kept@n: relearn@n minus the same relearning on the task's answers shuffled among its "
                  "examples (format right, content wrong)"]
    lines += [""] + notes
    lines += ["", "| method | plasticity | forgetting | LM loss after (before) | retained bytes | step time vs seqft |",
              "|---|---|---|---|---|---|"]
    for method, r in summary.items():
        ratio = "-" if r["step_time_ratio"] is None else f"{r['step_time_ratio']:.2f}x"
        lines.append(
            f"| {method} | {fmt(r['plasticity'], r['plasticity_std'])} | {fmt(r['forgetting'], r['forgetting_std'])} | "
            f"{fmt(r['lm_loss_after'], r['lm_loss_after_std'])} ({r['lm_loss_before']:.3f}) | "
            f"{int(r['retained_bytes']):,} | {ratio} |")
    beyond = [key for key in ["knowledge"] + [f"content_kept@{n}" for n in steps]
              if any(key + "_vs_base" in r for r in summary.values())]
    if beyond:  # the controlled measures against the base model, paired by seed
        lines += ["", "| method | " + " | ".join(f"{k.replace('_', ' ')} - base" for k in beyond) + " |",
                  "|---" * (len(beyond) + 1) + "|"]
        lines += [f"| {method} | " + " | ".join(fmt(r.get(k + "_vs_base"), r.get(k + "_vs_base_std")) for k in beyond)
                  + " |" for method, r in summary.items()]
        lines += ["", "beyond the base model: each controlled measure minus the base model's of the same seed, mean "
                  "± std over seeds (above 0 by more than the spread: the method's final model holds more than the "
                  "base)"]
    if guess:
        lines += ["", per_task_table(summary, guess["constant_guess_per_task"])]
    return "\n".join(lines)


def learned_accuracy(R, i):
    """R[i][i] of a sequence (task i right after it was learned, rows counted from 0 before any task); the final
    row of a joint run, which has no other."""
    return R[i + 1][i] if len(R) > i + 1 and len(R) > 2 else R[-1][i]


def per_task_table(summary, per_task):
    """Per task: its evaluation examples, the constant guess and one standard deviation of a score on that many
    examples at accuracy 0.5 (the widest binomial spread, sqrt(0.25 / n)), beside each method's R[i][i] (mean over
    seeds): a task learned no better than its constant guess was not learned."""
    header = ["task", "examples", "constant guess", "± (binomial)"] + list(summary)
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for i, (task, g) in enumerate(per_task.items()):
        cells = [task, str(g["n"]), f"{g['accuracy']:.3f} ({g['answer']})", f"{(0.25 / g['n']) ** 0.5:.3f}"]
        cells += [f"{learned_accuracy(r['R_mean'], i):.3f}" for r in summary.values()]
        lines.append("| " + " | ".join(cells) + " |")
    text = "R[i][i] per task (multitask: after its joint run), beside the constant guess\n\n" + "\n".join(lines)
    with_knowledge = [m for m, r in summary.items() if "knowledge_per_task" in r]
    if with_knowledge:  # forced choice - its control, per task: where the final model still reads the question
        lines = ["| task | " + " | ".join(with_knowledge) + " |", "|---" * (len(with_knowledge) + 1) + "|"]
        for task in per_task:
            lines.append(f"| {task} | " + " | ".join(f"{summary[m]['knowledge_per_task'][task]:.3f}"
                                                     for m in with_knowledge) + " |")
        text += "\n\nknowledge per task: forced choice - its control after the sequence, mean over seeds (the last " \
                "task's row is the one just learned)\n\n" + "\n".join(lines)
    return text


LEGEND = """Reading the columns (R[t][i]: exact-match accuracy on task i after training task t; T tasks):
- OP = mean_i R[T][i]: accuracy on every task after the whole sequence. BWT = mean_{i<T} (R[T][i] - R[i][i]):
  what the earlier tasks lost by the end (-1 total forgetting, 0 none).
- Each measure of what is kept is a mean over the earlier tasks (all but the last), every task counted once, and
  stands beside its control. exact match: the greedy answer is right; *constant guess*: always the task's most
  frequent training answer.
- forced choice: the share of evaluation examples whose correct answer has a higher log-likelihood than every
  distractor (answers of other evaluation examples of the task, same kind). control: the same candidates scored
  after another example's question, so answer priors (frequency, length, format) score the same in both.
  knowledge = forced choice - control: 0 for a model that knows the answers' priors only.
- relearn@n: accuracy after n steps of plain fine-tuning on that task alone, from the final model. kept@n =
  relearn@n - the base model's relearn@n (same steps, same seed). content kept@n = relearn@n - relearn@n on the
  task's answers shuffled among its examples: re-teaching restores the format either way, so what is left is what
  the model still holds of the content.
- plasticity = mean_i R[i][i]; forgetting = mean_{i<T} (max_{t<T} R[t][i] - R[T][i]); LM loss: base-corpus
  cross-entropy after (before) the sequence; retained bytes: what the method keeps between tasks; step time:
  against seqft's, seed by seed."""


# ----------------------------------------------------------------------------------------------------------------
# plots


# the tests turn it off where they do not look at the plots: building them is most of a tiny run's report
DRAW_PLOTS = True


def save_figure(fig, path):
    """A PNG written atomically (cache.write_atomically), then the figure closed."""
    if DRAW_PLOTS:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        cache.write_atomically(path, buffer.getvalue())
    plt.close(fig)


def panel_grid(n, width, height, columns=4, **kwargs):
    """A figure with n panels, at most `columns` a row; the panels left over are hidden."""
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, min(n, columns), figsize=(width * min(n, columns), height * rows),
                             squeeze=False, **kwargs)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_cl(summary, run_dir):
    """cl_matrix.png (accuracy-matrix heatmaps, mean over seeds), cl_curves.png (each task's accuracy along the
    sequence), cl_bars.png (OP and BWT with the seed spread)."""
    methods = list(summary)
    tasks = summary[methods[0]]["tasks"]
    fig, axes = panel_grid(len(methods), 4.2, 4)
    for ax, method in zip(axes, methods):
        R = summary[method]["R_mean"]
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for t, row in enumerate(R):
            for i, v in enumerate(row):
                ax.text(i, t, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(tasks)), tasks, rotation=60, fontsize=7)
        rows = ["base"] + (tasks if len(R) == len(tasks) + 1 else ["all"])[: len(R) - 1]
        ax.set_yticks(range(len(R)), ["after " + r if r != "base" else r for r in rows], fontsize=7)
        ax.set_title(method)
    fig.suptitle("accuracy R[after row][task column], mean over seeds")
    fig.tight_layout()
    save_figure(fig, os.path.join(run_dir, "cl_matrix.png"))

    sequential = [m for m in methods if len(summary[m]["R_mean"]) == len(tasks) + 1]
    if sequential:
        fig, axes = panel_grid(len(sequential), 4.2, 3.3, sharey=True)
        for ax, method in zip(axes, sequential):
            R = torch.tensor(summary[method]["R_mean"])
            for i, task in enumerate(tasks):
                ax.plot(range(len(R)), R[:, i], marker=".", label=task)
            ax.set_xticks(range(len(R)), ["base"] + [f"+{t}" for t in tasks], rotation=60, fontsize=7)
            ax.set_title(method)
            ax.set_ylim(-0.05, 1.05)
            ax.yaxis.set_tick_params(labelleft=True)
        axes[0].legend(fontsize=7, loc="upper right", ncol=2)
        fig.supylabel("accuracy on each task, mean over seeds")
        fig.tight_layout()
        save_figure(fig, os.path.join(run_dir, "cl_curves.png"))

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, key in zip(axes, ("op", "bwt")):
        values = [summary[m][key] if summary[m][key] is not None else 0.0 for m in methods]
        errors = [summary[m][key + "_std"] or 0.0 for m in methods]
        ax.bar(methods, values, yerr=errors, capsize=4, color="tab:blue")
        ax.axhline(0, color="k", lw=0.5)
        ax.tick_params(axis="x", rotation=30)
        ax.set_title(key.upper() + f" (mean ± std over {len(summary[methods[0]]['seeds'])} seed(s))")
    fig.tight_layout()
    save_figure(fig, os.path.join(run_dir, "cl_bars.png"))


def over_points(entry, where, key, per=None):
    """sum_p key / sum_p per over the SAE points of one diagnostic entry (per: a count, or None for the mean),
    at `where`: 'tokens' (every content token) or 'answers' (the answer positions)."""
    points = [p[where] for p in entry["points"].values()]
    return sum(p[key] for p in points) / (sum(per(p) for p in points) if per else len(points))


DIAGNOSTIC_CURVES = {  # curve -> (panel title, its value from one diagnostic entry of an earlier task); drift per
    # feature: sum_j m_j d_j / sum_j m_j (the task's mask) and sum_j (1 - m_j) d_j / sum_j (1 - m_j), over all points
    "drift_mask": ("drift per feature: the task's", lambda d: over_points(d, "tokens", "drift_mask",
                                                                          lambda p: p["mask_mass"])),
    "drift_rest": ("drift per feature: the others'", lambda d: over_points(d, "tokens", "drift_rest",
                                                                           lambda p: p["features"] - p["mask_mass"])),
    "error_norm_change": ("SAE error norm, relative change",  # sum_p change_p / sum_p mean ||x - xhat||_end
                          lambda d: over_points(d, "tokens", "error_norm_change", lambda p: p["error_norm_end"])),
    "answer_drift_mask": ("the task's drift at the answer positions", lambda d: over_points(
        d, "answers", "drift_mask", lambda p: p["mask_mass"])),
    "residual": ("residual stream moved / its norm", lambda d: over_points(d, "tokens", "residual")),
    "answer_residual": ("the same at the answer positions", lambda d: over_points(d, "answers", "residual")),
    "answer_reconstruction": ("of it, what the SAE reconstructs: at the answers",
                              lambda d: over_points(d, "answers", "reconstruction")),
    "answer_error": ("of it, the SAE's error: at the answers", lambda d: over_points(d, "answers", "error")),
    "answer_kl": ("KL at answer positions", lambda d: d["answer_kl"]),
    "format_confusion": ("answers in the latest task's format", lambda d: d["format_confusion"]),
    # the answers' move attributed to the parts of the stream's at the last point (evaluate.answer_attribution;
    # absent where no SAE reads that point), and how much of the task's mask the latest task's mask covers
    "kl_reconstruction": ("KL at the answers: the reconstruction moved alone",
                          lambda d: attributed(d, "reconstruction")),
    "kl_error": ("KL at the answers: the SAE error moved alone", lambda d: attributed(d, "error")),
    "kl_own": ("KL at the answers: the task's features alone", lambda d: attributed(d, "own")),
    "kl_rest": ("KL at the answers: the other features alone", lambda d: attributed(d, "rest")),
    "mask_shared": ("the task's mask the latest task's covers", lambda d: (
        sum(d["mask_shared"].values()) / len(d["mask_shared"]) if "mask_shared" in d else None)),
}


def attributed(entry, part):
    """KL(f(x_end) || f(x_end + part)) at the answer positions, or None where the run did not measure it."""
    return entry["answer_attribution"][part] if "answer_attribution" in entry else None


def diagnostic_curves(runs):
    """{curve: [value after task t, for t = 2..T]}: each DIAGNOSTIC_CURVES quantity (over all SAE points together)
    averaged over the earlier tasks s < t and over the runs (seeds), plus the earlier tasks' accuracy. A quantity
    that some run did not measure is left out."""
    measured = {name: value for name, (_, value) in DIAGNOSTIC_CURVES.items()
                if all(value(r["diagnostic"][1][r["tasks"][0]]) is not None for r in runs)}
    curves = {"accuracy": []} | {name: [] for name in measured}
    for t in range(1, len(runs[0]["diagnostic"])):
        tasks = runs[0]["tasks"][:t]
        curves["accuracy"].append(sum(r["R"][t + 1][s] for r in runs for s in range(t)) / (t * len(runs)))
        for name, value in measured.items():
            curves[name].append(sum(value(r["diagnostic"][t][s]) for r in runs for s in tasks) / (t * len(runs)))
    return curves


def plot_forgetting(summary, run_dir):
    """forgetting.png: the forgetting diagnostic along the sequence, one panel per quantity, a line per method;
    each point is the mean over the tasks learned before task t (and over seeds)."""
    methods = [m for m in summary if "diagnostic" in summary[m]]
    if not methods:
        return
    tasks = summary[methods[0]]["tasks"]
    titles = {"accuracy": "accuracy of earlier tasks"} | {k: v[0] for k, v in DIAGNOSTIC_CURVES.items()
                                                           if all(k in summary[m]["diagnostic"] for m in methods)}
    aux = [m for m in methods if "aux_accuracy" in summary[m]]
    fig, axes = panel_grid(len(titles) + bool(aux), 4.0, 3.2, columns=4)
    for ax, (key, title) in zip(axes, titles.items()):
        for method in methods:
            values = summary[method]["diagnostic"][key]
            ax.plot(range(2, 2 + len(values)), values, marker=".", label=method)
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="k", lw=0.5)
    if aux:  # the instruction-following accuracy from the base (x = 0) to the end
        ax = axes[-1]
        for method in aux:
            ax.plot(range(len(summary[method]["aux_accuracy"])), summary[method]["aux_accuracy"], marker=".",
                    label=method)
        ax.set_title("auxiliary (instruction) accuracy", fontsize=10)
        ax.set_ylim(-0.05, 1.05)
    for ax in axes:
        ax.set_xticks(range(0, len(tasks) + 1), ["base"] + [f"+{t}" for t in tasks], rotation=60, fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle("forgetting diagnostic: on the tasks learned before, after each task (mean over them and seeds)")
    fig.tight_layout()
    save_figure(fig, os.path.join(run_dir, "forgetting.png"))


MARKERS = "osD^vP*Xh<>"


def plot_knowledge(summary, run_dir):
    """knowledge.png, each measure beside its control: (1) the relearning curves on the earlier tasks per method,
    the base model dashed; (2) knowledge (forced choice - its question-blind control) against exact match;
    (3) content kept@n (relearning on true minus on shuffled answers) per method, the base model's as a line."""
    steps = relearn_steps(summary)
    methods = [m for m in summary if any(f"relearn@{n}" in summary[m] for n in steps) or "knowledge" in summary[m]]
    if not methods:
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8))
    colours = {m: plt.get_cmap("tab20")(2 * i % 20 + 2 * i // 20) for i, m in enumerate(summary)}  # 20 distinct
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(summary)}
    for method in methods:
        if all(f"relearn@{n}" in summary[method] for n in steps) and steps:
            r = summary[method]
            ax1.errorbar(steps, [r[f"relearn@{n}"] for n in steps], yerr=[r[f"relearn@{n}_std"] or 0 for n in steps],
                         marker=marker[method], capsize=3, color=colours[method], label=method)
    base = next((r["base"] for r in summary.values() if "base" in r), None)
    if base and steps and all(f"relearn@{n}" in base for n in steps):
        ax1.plot(steps, [base[f"relearn@{n}"] for n in steps], "k--", marker="s", label="base model")
    ax1.set(xlabel="steps of fine-tuning on the task alone", ylabel="accuracy on the earlier tasks",
            title="relearning from the final model", ylim=(-0.03, 1.03))
    ax1.set_xticks(steps)
    ax1.legend(fontsize=7, ncol=2)
    for method in methods:
        r = summary[method]
        if "knowledge" in r and r["plasticity"] is None:  # a joint run (multitask): no plasticity, a line
            ax2.axhline(r["knowledge"], color=colours[method], ls="-.", lw=1, label=f"{method} ({r['knowledge']:.2f})")
        elif "knowledge" in r:
            ax2.errorbar(r["plasticity"], r["knowledge"], xerr=r["plasticity_std"] or 0,
                         yerr=r["knowledge_std"] or 0, marker=marker[method], capsize=3, color=colours[method])
            ax2.annotate(method, (r["plasticity"], r["knowledge"]), fontsize=8, xytext=(4, 4),
                         textcoords="offset points")
    ax2.axhline(0, color="grey", ls=":", label="answer priors only (the control)")
    if base and "knowledge" in base:
        ax2.axhline(base["knowledge"], color="k", ls="--", label=f"base model ({base['knowledge']:.2f})")
    ax2.set(xlabel="plasticity (mean R[i][i]: each task right after it was learned)",
            ylabel="knowledge = forced choice - its control", title="does the final model read the question?",
            xlim=(-0.03, 1.03))
    ax2.legend(fontsize=7, loc="lower right")
    content = [n for n in steps if n > 0 and all(f"content_kept@{n}" in summary[m] for m in methods)]
    width = 0.8 / max(1, len(content))
    for j, n in enumerate(content):
        x = [i + (j - (len(content) - 1) / 2) * width for i in range(len(methods))]
        ax3.bar(x, [summary[m][f"content_kept@{n}"] for m in methods], width,
                yerr=[summary[m][f"content_kept@{n}_std"] or 0 for m in methods], capsize=2,
                color=plt.get_cmap("Blues")(0.45 + 0.5 * j / max(1, len(content) - 1)), label=f"after {n} steps")
        if base and f"content_kept@{n}" in base:
            ax3.axhline(base[f"content_kept@{n}"], color=plt.get_cmap("Greys")(0.5 + 0.4 * j / max(1, len(content))),
                        ls="--", lw=1, label=f"base model, {n} steps")
    ax3.axhline(0, color="grey", lw=0.8)
    ax3.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
    ax3.set(ylabel="relearn(true answers) - relearn(shuffled)", title="content kept: beyond re-teaching the format")
    ax3.legend(fontsize=7)
    seeds = summary[methods[0]]["seeds"]
    fig.suptitle(f"what each method keeps of the tasks before the last, each beside its control "
                 f"(mean ± std over seeds {seeds})")
    fig.tight_layout()
    save_figure(fig, os.path.join(run_dir, "knowledge.png"))


def plot_sae_metrics(results, run_dir):
    """sae_metrics.png: L0, FVU, dead fraction and CE increase per point (first k); with several k, also
    sae_k_sweep.png: CE increase against L0 per point, and FVU against k."""
    ks = list(results["by_k"])
    first = results["by_k"][ks[0]]["points"]
    points = list(first)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, (key, title) in zip(axes, [("l0", "L0"), ("fvu", "FVU"), ("dead_fraction", "dead fraction"),
                                       ("ce_increase", "CE increase (nats)")]):
        ax.bar([str(p) for p in points], [first[p][key] for p in points], color="tab:blue")
        ax.set_title(title)
        ax.set_xlabel("residual point")
    fig.suptitle(f"TopK SAEs, k={ks[0]}, held-out base-corpus text")
    fig.tight_layout()
    save_figure(fig, os.path.join(run_dir, "sae_metrics.png"))
    if len(ks) < 2:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for p in points:
        l0s = [results["by_k"][k]["points"][p]["l0"] for k in ks]
        ce = [results["by_k"][k]["points"][p]["ce_increase"] for k in ks]
        ax1.plot(l0s, ce, "o-", label=f"point {p}")
        ax2.plot([int(k) for k in ks], [results["by_k"][k]["points"][p]["fvu"] for k in ks], "o-", label=f"point {p}")
    ax1.set(xscale="log", xlabel="L0", ylabel="CE increase (nats)", title="CE increase vs L0")
    ax2.set(xscale="log", xlabel="k", ylabel="FVU", title="FVU vs k")
    for ax in (ax1, ax2):  # ticks at the k of the sweep (L0 = k for TopK), written as plain numbers
        ax.set_xticks([int(k) for k in ks], [str(k) for k in ks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, os.path.join(run_dir, "sae_k_sweep.png"))


# ----------------------------------------------------------------------------------------------------------------
# the report


def write_report(summary, table, run_dir):
    first = next(iter(summary.values()))
    lines = [f"# Continual learning: {os.path.basename(os.path.normpath(run_dir))}", "", LEGEND, "",
             f"Tasks in order: {', '.join(first['tasks'])}. Accuracy on the `{first['eval_split']}` split; "
             f"seeds {first['seeds']}.", "", table, "",
             "![accuracy matrices](cl_matrix.png)", "", "![accuracy along the sequence](cl_curves.png)", "",
             "![OP and BWT](cl_bars.png)", ""]
    if os.path.exists(os.path.join(run_dir, "knowledge.png")):
        lines += ["![what each method keeps](knowledge.png)", ""]
    if os.path.exists(os.path.join(run_dir, "forgetting.png")):
        lines += ["![the forgetting diagnostic](forgetting.png)", ""]
    cache.save_text("\n".join(lines), os.path.join(run_dir, "report.md"))


# ----------------------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python report.py out/<run>   (rebuilds the report from the saved JSON)", file=sys.stderr)
        sys.exit(2)
    try:
        summarize_run(sys.argv[1])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
