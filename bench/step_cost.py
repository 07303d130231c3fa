"""
Where the time of a continual-learning step goes: seqft's step against SAE-guided's, on the run's base model and
SAEs, one thread, the same batches of each task; seqft's step with the last block's MLP and the head run at every
position too, not at the answers only (model.GPT.forward's head_at), and under LoRA with the adapters as thin
products, not folded into the weight. Then the parts of SAE-guided's penalty timed alone (the SAE encoding of the
model's own codes, the look-up of the cached reference codes, the drift and hinges) and the operators that take the
most CPU time in its step (torch.profiler).

    python -m bench.step_cost                    # the default run (its base and SAEs are made if missing)
    python -m bench.step_cost --preset=paper --run=paper
"""

import sys
import time

import torch

import configurator as cfg
import jobs
import regularizers as reg
import sae_stage
import train
from data.tasks import trim_padding
from model import LoRALinear, model_from_checkpoint
from pretrain import pretrain

STEPS, ROUNDS = 50, 2  # steps per task and method, and how often the methods take turns (the clock drifts)


class NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass


def step_ms(name, config, base, saes, suite, head_everywhere=False):
    """ms per step of method `name` over STEPS steps of each task (fresh model; each task's hooks as in the loop)."""
    model = model_from_checkpoint(base, "cpu")
    if config.finetune == "lora":
        model.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets)
    method = reg.METHODS[name](config, model, saes, seed=0)
    method.reads_logits = method.reads_logits or head_everywhere  # the step then runs the head at every position
    generator, seconds = torch.Generator().manual_seed(0), 0.0
    for t, task in enumerate(config.tasks):
        split = suite[task]["train"]
        method.before_task(model, split, t)
        seconds += train.train_steps(model, split, STEPS, method, config=config, device="cpu", generator=generator,
                                     bar=NoBar())
        method.after_task(model, split, t)
    return 1000 * seconds / (STEPS * len(config.tasks)), model, method


def penalty_parts_ms(model, method, split, config, n=STEPS):
    """ms per batch of each part of SAE-guided's penalty, without autograd: (encode, look-up, drift and hinges)."""
    generator = torch.Generator().manual_seed(1)
    method.before_task(model, split, len(config.tasks))
    parts = dict.fromkeys(("encode", "lookup", "drift"), 0.0)
    with torch.no_grad():
        for _ in range(n):
            batch = trim_padding(split.batch(config.cl_batch_size, generator, "cpu"))
            _, _, residuals = model(batch.x, read=method.reads)
            t0 = time.perf_counter()
            codes = {p: reg.content_codes(sae, residuals[p], batch.content_mask) for p, sae in method.saes.items()}
            t1 = time.perf_counter()
            ref_codes = reg.lookup_codes(method.cached_codes, batch)
            t2 = time.perf_counter()
            drifts = {p: reg.code_drift(codes[p], ref_codes[p], sae.config.d_sae) for p, sae in method.saes.items()}
            reg.sae_guided_penalty(drifts, method.mask, lambda_p=1.0, lambda_g=1.0, eps=0.0, delta=0.0)
            t3 = time.perf_counter()
            for part, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[part] += seconds
    method.after_task(model, split, len(config.tasks))
    return {part: 1000 * s / n for part, s in parts.items()}


def main(argv):
    args = cfg.parse_script_args(argv, cfg.NoOptions, "python -m bench.step_cost", __doc__)
    if args is None:
        return 0
    torch.set_num_threads(1)
    config = cfg.parse_args(args[1] + ["--methods=seqft,sae_guided"])
    device = cfg.resolve_device(config)
    base = pretrain(config, device)
    sae_checkpoint = sae_stage.train_sae_stage(config, device, base)
    saes = sae_stage.load_saes(sae_checkpoint, model_from_checkpoint(base, "cpu"), "cpu")
    suite = train.task_suite(config)
    times = {"seqft": [], "sae_guided": [], "seqft, head everywhere": []}
    if config.finetune == "lora":  # and seqft with the adapters as thin products, not folded (model.LoRALinear)
        times["seqft, adapters thin"] = []
    try:
        for _ in range(ROUNDS):
            for name in times:
                LoRALinear.fold = name != "seqft, adapters thin"
                ms, model, method = step_ms(name.split(",")[0], config, base, saes, suite,
                                            head_everywhere=name == "seqft, head everywhere")
                times[name].append(ms)
                if name == "sae_guided":
                    guided = model, method
    finally:
        LoRALinear.fold = True
    for name, ms in times.items():
        print(f"{name}: " + ", ".join(f"{m:.1f}" for m in ms) + f" ms per step ({STEPS} steps of each task, "
              f"{ROUNDS} rounds)")
    ratio = sum(times["sae_guided"]) / sum(times["seqft"])
    print(f"SAE-guided / seqft: {ratio:.2f}x")
    model, method = guided  # SAE-guided's last run: the parts of its penalty, then the operators of its step
    parts = penalty_parts_ms(model, method, suite[config.tasks[0]]["train"], config)
    print(f"SAE-guided's penalty, forward only, per batch of {config.tasks[0]}: "
          + ", ".join(f"{part} {ms:.2f} ms" for part, ms in parts.items()))
    generator = torch.Generator().manual_seed(2)
    split = suite[config.tasks[0]]["train"]
    method.before_task(model, split, len(config.tasks))
    with torch.profiler.profile() as profiler:
        train.train_steps(model, split, 20, method, config=config, device="cpu", generator=generator, bar=NoBar())
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    sys.exit(jobs.run_script(main, sys.argv[1:]))
