"""
The analyses behind the paper's thesis, beyond benchmark scores, in the tiny setting: is a task visible in the
SAE's features and not in the weights (separability), does protecting a task in weight space also hold back what
the next task needs (collateral constraint), do SAE features line up with the world's true variables (ground truth,
which the paper cannot have), what does each method keep between tasks as the model grows (memory), and which
parts of SAE-guided regularization matter (ablations).

    python -m evidence --jobs=2                            # all five on the default run; ablations and collateral
                                                           # over seeds 0-2
    python -m evidence --parts=separability,ground_truth   # some of them (separability, collateral, ground_truth,
                                                           # memory, ablations); other keys: the pipeline's

One module an analysis, in this folder: probe.py (the linear probe), separability.py, collateral.py,
ground_truth.py, memory.py, ablations.py; this file runs them and writes their report. The base model and SAEs
are the pipeline's own (pretrain.pretrain, sae_stage.train_sae_stage: reused when cached); the ablation runs are
cached like any continual-learning run, under out/<run>/evidence_<variant>/, and go on in a
process of their own (with its --jobs workers) while the other analyses run, each on one thread. Results go to
out/<run>/evidence/ as <part>.json and <part>.png, with the tables in evidence.md.
"""

import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

import cache
import configurator as cfg
import regularizers as reg
import sae_stage
import train
from data.tasks import build_task_suite
from evidence.ablations import ablation_variants, ablations, ablations_table, plot_ablations
from evidence.collateral import collateral, collateral_table, plot_collateral
from evidence.ground_truth import ground_truth, ground_truth_table, plot_ground_truth
from evidence.memory import MEMORY_WIDTHS, memory_by_width, memory_table, plot_memory
from evidence.separability import plot_separability, separability, separability_table
from jobs import progress
from model import model_from_checkpoint
from pretrain import pretrain


PARTS = ("separability", "collateral", "ground_truth", "memory", "ablations")
ABLATION_SEEDS = (0, 1, 2)  # the ablations' seeds unless --seeds is given
TABLES = {"separability": separability_table, "collateral": collateral_table, "ground_truth": ground_truth_table,
          "memory": memory_table, "ablations": ablations_table}
PLOTS = {"separability": plot_separability, "collateral": plot_collateral, "ground_truth": plot_ground_truth,
         "memory": plot_memory, "ablations": plot_ablations}


@dataclass
class Options:
    # python -m evidence (its other keys are the run's; --seeds defaults to 0,1,2 here, for ablations and collateral)
    parts: tuple[str, ...] = PARTS  # the analyses to run
    CHOICES = {"parts": PARTS}


def parse_args(argv):
    """(parts, configurator.Config), or None for --help."""
    parsed = cfg.parse_script_args(argv, Options, "python -m evidence", __doc__)
    if parsed is None:
        return None
    options, rest = parsed
    if not options.parts:
        raise ValueError(f"--parts: give at least one of {', '.join(PARTS)}")
    seeds = [] if any(a.startswith("--seeds=") for a in rest) else ["--seeds=" + ",".join(map(str, ABLATION_SEEDS))]
    config = cfg.parse_args(seeds + rest)
    comparing = [p for p in options.parts if p in ("separability", "collateral")]
    if comparing and len(config.tasks) < 2:
        raise ValueError(f"--tasks={','.join(config.tasks)}: {' and '.join(comparing)} compare tasks; give at least "
                         "two")
    return options.parts, config


def timed(function, *args):
    """(function(*args), the seconds it took)."""
    t0 = time.time()
    return function(*args), time.time() - t0


def save(part, result, seconds, out_dir, command):
    """Write a part's JSON and plot, print its table; returns its section of evidence.md."""
    cache.save_json(result, os.path.join(out_dir, f"{part}.json"))
    PLOTS[part](result, os.path.join(out_dir, f"{part}.png"))
    table = TABLES[part](result)
    print(table)
    return f"## {part} ({seconds:.0f} s, `{command}`)\n\n{table}\n\n![{part}]({part}.png)\n"


def write_report(sections, path):
    """evidence.md: the new sections {part: text}, and those of the parts not run this time as an earlier run left
    them (their JSON and plots are still there), in the order of PARTS."""
    if os.path.exists(path):
        with open(path) as f:
            for text in f.read().split("\n## ")[1:]:
                part = text.split(" ", 1)[0]
                if part in PARTS and part not in sections:
                    sections[part] = "## " + text.rstrip("\n") + "\n"
    body = "\n".join(sections[part] for part in PARTS if part in sections)
    cache.save_text("# Evidence for the thesis (each section names the command that made it)\n\n" + body, path)


def main(argv):
    parsed = parse_args(argv)
    if parsed is None:
        return 0
    parts, config = parsed
    train.check_inputs(config)
    device = cfg.resolve_device(config)
    base = pretrain(config, device)
    sae_checkpoint = sae_stage.train_sae_stage(config, device, base)
    model = model_from_checkpoint(base, device)
    saes = sae_stage.load_saes(sae_checkpoint, model, device)
    out_dir = os.path.join(config.out_dir, config.run, "evidence")
    os.makedirs(out_dir, exist_ok=True)
    suite = build_task_suite(config.tasks, config.n_train, config.n_val, config.n_test, seed=0,
                             block_size=config.block_size, template_is_content=False)

    def analyse(part):
        """The result of one analysis other than the ablations."""
        if part == "separability":
            return separability(model, saes, suite, config.tasks)
        if part == "ground_truth":
            return ground_truth(model, saes, device=device)
        if part == "memory":
            # what a method keeps does not depend on how many examples its importance or mask is estimated on, nor
            # on SAE-guided's codes: dense ones hold the reference as a frozen copy during the task instead of
            # encoding every training example at task start (both are dropped when the task ends)
            memory_config = dataclasses.replace(config, ewc_fisher_examples=8, mas_examples=8,
                                                sae_guided_mask_examples=32, sae_guided_codes="dense")
            return memory_by_width(memory_config, widths=MEMORY_WIDTHS)
        results = []  # collateral: every pair of consecutive tasks, for each seed (A's and B's batches, Fisher)
        for seed in config.seeds:
            for task_a, task_b in zip(config.tasks, config.tasks[1:]):
                model_a = model_from_checkpoint(base, device)
                generator = torch.Generator().manual_seed(seed)
                with progress(total=config.steps_per_task, desc=f"collateral: learn {task_a}, seed {seed}",
                              leave=False) as bar:
                    train.train_steps(model_a, suite[task_a]["train"], config.steps_per_task,
                                      reg.SeqFT(config, model_a), config=config, device=device, generator=generator,
                                      bar=bar)
                results.append(collateral(config, model_a, saes, suite, task_a, task_b, device=device, seed=seed))
        return results

    # Every analysis runs on one thread, as every continual-learning run does (train.run_and_save), so that its
    # numbers do not depend on the machine's core count; meanwhile the ablations' runs go on in a process of their
    # own (with its config.jobs workers), so that the cores stay busy.
    t_start, threads, sections = time.time(), torch.get_num_threads(), {}
    command = f"python -m evidence {' '.join(argv)}".strip()
    torch.set_num_threads(1)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as background:
            if "ablations" in parts:
                ablation_run = background.submit(timed, ablations, config, device, base, sae_checkpoint,
                                                 ablation_variants(config))
            for part in parts:
                if part != "ablations":  # the ablations come last, when their runs are done
                    sections[part] = save(part, *timed(analyse, part), out_dir, command)
            if "ablations" in parts:
                sections["ablations"] = save("ablations", *ablation_run.result(), out_dir, command)
    finally:
        torch.set_num_threads(threads)
    write_report(sections, os.path.join(out_dir, "evidence.md"))
    print(f"evidence: {len(sections)} parts in {time.time() - t_start:.0f} s (the ablations beside the others); tables "
          f"in {os.path.join(out_dir, 'evidence.md')}")
    return 0

