"""
Measurements: what a model does on the tasks, what an SAE keeps of the activations, and the continual-learning
metrics. (report.py turns saved results into tables, plots and the report.)

- Task accuracy: exact match of the greedy-decoded answer (computed teacher-forced, in one pass).
- What a model knows beyond its greedy answers, each beside its control: forced-choice accuracy (does the correct
  answer outrank answers of the same task and kind?) and the same after another example's question (answer priors
  alone); with the relearning curves train.py measures (true and shuffled answers), kept@n and content kept@n
  (knowledge_metrics).
- Continual-learning metrics from the accuracy matrix R, where R[t][i] is the accuracy on task i after training
  task t (row 0: before any task): OP, plasticity, BWT, forgetting.
- SAE metrics on held-out text: L0, FVU, explained variance, dead fraction, cosine(x, xhat), CE increase when a
  reconstruction is spliced into the model, compound CE increase with every point spliced at once.
- The forgetting diagnostic: after each task, on every earlier task's evaluation inputs, where the forgetting is:
  in the SAE features that task relied on or in the rest, in the part of the activation the SAE does not
  reconstruct, in the output distribution, and in the answers' format. Measurement only; it never feeds training.
"""

import random

import torch
import torch.nn.functional as F

from data.tasks import Batch, answer_format, answer_kind, format_example, trim_padding
from data.tokenizer import NEWLINE, decode, encode
from regularizers import propagate_mask, relative_move

# ----------------------------------------------------------------------------------------------------------------
# task accuracy


@torch.no_grad()
def task_accuracy(model, split, device, batch_size=256):
    """Exact-match accuracy of greedy decoding on a TaskSplit, in one teacher-forced pass.

    Greedy decoding writes the answer and then the newline that ends it exactly when, at every completion
    position, the argmax of the next-token logits given the true prefix is the true next token:
        correct_i = prod over completion positions t of [ argmax_v logits_i[t, v] == y_i[t] ]
    So a single forward pass over prompt + answer scores every example, with no token-by-token decoding and no
    cap on the answer's length."""
    was_training = model.training
    model.eval()
    correct = []
    for start in range(0, len(split), batch_size):
        batch = trim_padding(Batch(*(t.to(device) for t in split.rows(slice(start, start + batch_size)))))
        answers = batch.answer_mask.bool()  # the head runs there only (model.GPT.forward, head_at)
        predicted = batch.y.clone()  # right wherever nothing is predicted
        predicted[answers] = model(batch.x, head_at=answers)[0].argmax(-1)
        correct.append((predicted == batch.y).all(-1))
    model.train(was_training)
    return torch.cat(correct).float().mean().item()


def mean_accuracy(model, splits, device):
    """(1/S) sum_s task_accuracy(split s): the mean over tasks, each counted once whatever its size."""
    return sum(task_accuracy(model, split, device) for split in splits) / len(splits)


@torch.no_grad()
def greedy_answers(model, split, device, n_examples=None):
    """The greedy-decoded answers (text up to the newline) of a TaskSplit's first n_examples prompts, all decoded
    side by side: each step runs the batch once and appends every unfinished row's argmax at its own position (a
    causal model never looks at the padding to the right of a row). At most 4 characters more than the longest
    true answer and its newline, within the block size."""
    was_training = model.training
    model.eval()
    examples = split.examples[:n_examples]
    prompts = [encode(format_example(q, a)[0]) for q, a in examples]
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    max_new = min(max(len(a) for _, a in examples) + 5, model.config.block_size - int(lengths.max()))
    x = torch.full((len(prompts), int(lengths.max()) + max_new), NEWLINE, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        x[i, : len(p)] = torch.tensor(p)
    position, done = lengths.clone(), torch.zeros(len(prompts), dtype=torch.bool, device=device)
    rows = torch.arange(len(prompts), device=device)
    for _ in range(max_new):
        logits = model(x[:, : int(position.max())])[0]
        next_token = logits[rows, position - 1].argmax(-1)
        x[rows[~done], position[~done]] = next_token[~done]
        done |= next_token == NEWLINE
        position = torch.where(done, position, position + 1)
        if done.all():
            break
    model.train(was_training)
    return [decode(x[i, n : int(position[i])].tolist()) for i, n in enumerate(lengths.tolist())]


# ----------------------------------------------------------------------------------------------------------------
# forced choice: knowledge without the answer's format


def choice_candidates(split, k, seed=0):
    """For each example of the split, [its answer, then up to k distractors]: answers of other examples of the same
    split and task (the pool the correct answer comes from, so memorised training answers neither help nor sink a
    score) of the same answer_kind (facts: the fact asked for; close: as many brackets; the rest: the answer's
    character classes and length), different from the correct answer and from each other. Distractors are drawn
    with the pool's repeats, so a common answer is drawn more often. A kind with fewer distinct answers gives fewer
    distractors (stance: one)."""
    rng = random.Random(seed)
    by_kind = {}
    for _, answer in split.examples:
        by_kind.setdefault(answer_kind(split.name, answer), []).append(answer)
    candidates = []
    for _, answer in split.examples:
        same_kind = by_kind[answer_kind(split.name, answer)]
        n_distractors = min(k, len(set(same_kind) - {answer}))
        chosen = []
        while len(chosen) < n_distractors:
            other = rng.choice(same_kind)
            if other != answer and other not in chosen:
                chosen.append(other)
        candidates.append([answer] + chosen)
    return candidates


def blind_questions(split, seed=0):
    """For each example, the question of another example of the split whose answer differs (seeded): the question-
    blind control of forced choice reads it in place of the example's own. A model that knows the answer's prior
    only (how often, how long, what format) scores the control as it scores forced choice; a model that reads the
    question ranks the example's answer high under its own question only."""
    rng = random.Random(seed)
    examples = split.examples
    blind = []
    for _, answer in examples:
        others = [q for q, a in examples if a != answer]
        blind.append(rng.choice(others) if others else None)
    return blind


def shared_prompt_rows(questions, candidates):
    """Forced choice's rows, one per example, its prompt read once for all of its candidates:

        x = prompt + c_1[:-1] + c_2[:-1] + ...      c_j: candidate j's completion tokens (its answer and newline)

    Candidate j's tokens take the positions they would have after the prompt alone (len(prompt) + t) and attend to
    the prompt and to their own earlier tokens only, so the model reads each candidate exactly as in a row of its
    own, prompt + c_j; the first token of every candidate is predicted at the prompt's last position, which they
    share. Rows are padded with newlines (padding attends to itself only). Returns (x, positions, attention,
    lengths, targets): x and positions (N, L), attention (N, L, L) bool (True: may attend), each row's real length,
    and one (row, position, token, candidate number) for every token of every candidate, the candidates numbered
    in order over all examples."""
    rows, targets, n = [], [], 0
    for i, (question, answers) in enumerate(zip(questions, candidates)):
        prompt = encode(format_example(question, "")[0])
        tokens, positions, segment = list(prompt), list(range(len(prompt))), [0] * len(prompt)
        for j, answer in enumerate(answers, start=1):
            completion = encode(format_example(question, answer)[1])
            start = len(tokens)  # where this candidate's tokens go in the row
            for t, token in enumerate(completion):  # token t is predicted where token t - 1 is read (t = 0: the prompt)
                targets.append((i, len(prompt) - 1 if t == 0 else start + t - 1, token, n))
            tokens += completion[:-1]
            positions += range(len(prompt), len(prompt) + len(completion) - 1)
            segment += [j] * (len(completion) - 1)
            n += 1
        rows.append((tokens, positions, segment))
    L = max(len(tokens) for tokens, _, _ in rows)
    x = torch.full((len(rows), L), NEWLINE, dtype=torch.long)
    positions = torch.zeros(len(rows), L, dtype=torch.long)
    attention = torch.eye(L, dtype=torch.bool).repeat(len(rows), 1, 1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i, (tokens, position, segment) in enumerate(rows):
        m = len(tokens)
        x[i, :m], positions[i, :m] = torch.tensor(tokens), torch.tensor(position)
        segment = torch.tensor(segment)
        # causal, and within the prompt (segment 0) or the token's own candidate
        attention[i, :m, :m] = causal[:m, :m] & ((segment[None, :] == 0) | (segment[:, None] == segment[None, :]))
    lengths = torch.tensor([len(tokens) for tokens, _, _ in rows])
    return x, positions, attention, lengths, torch.tensor(targets)


@torch.no_grad()
def candidate_scores(model, questions, candidates, device, batch_size=64):
    """Every candidate's score after its example's question, in order over all examples (float64):

        score(a) = sum over the completion's tokens (the answer and its newline) of log p(a_t | prompt, a_<t)

    teacher-forced, every candidate of batch_size examples in one pass, each prompt read once (shared_prompt_rows)."""
    was_training = model.training
    model.eval()
    x, positions, attention, lengths, targets = shared_prompt_rows(questions, candidates)
    too_far = (positions.amax(1) >= model.config.block_size).nonzero().flatten().tolist()
    if too_far:  # a blind question with a long candidate can outgrow the block
        raise ValueError(f"forced choice: {questions[too_far[0]]!r} with its candidates reaches position "
                         f"{int(positions[too_far[0]].max())} >= block_size {model.config.block_size}")
    scores = torch.zeros(sum(len(cs) for cs in candidates), dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        rows = slice(start, start + batch_size)
        L = int(lengths[rows].max())  # cut the columns that are padding in every row of the batch
        row, position, token, candidate = targets[(targets[:, 0] >= start) & (targets[:, 0] < start + batch_size)].T
        scored = torch.zeros(len(x[rows]), L, dtype=torch.bool)  # the positions whose next token is scored
        scored[row - start, position] = True
        logits = model(x[rows, :L].to(device), positions=positions[rows, :L].to(device),
                       attention=attention[rows, :L, :L].to(device), head_at=scored.to(device))[0]  # there only
        log_probs = F.log_softmax(logits.double(), dim=-1)  # (N, vocab), in the order of scored.nonzero()
        index = torch.zeros(scored.shape, dtype=torch.long)
        index[scored] = torch.arange(len(logits))
        picked = log_probs[index[row - start, position].to(device), token.to(device)]
        scores.index_add_(0, candidate, picked.cpu())
    model.train(was_training)
    return scores


def forced_choice_accuracy(model, split, candidates, device, questions=None, batch_size=64):
    """(accuracy, chance): the share of examples whose correct answer (each example's first candidate) scores
    highest among its candidates (candidate_scores); a tie of the correct answer with m - 1 others for the highest
    score counts 1/m (the expected credit of a random tie-break). chance is the mean over examples of
    1 / (number of candidates). questions: the prompt each example's candidates are scored after (default: its own
    question; blind_questions gives the control's)."""
    questions = questions or [q for q, _ in split.examples]
    scores = candidate_scores(model, questions, candidates, device, batch_size)
    per_example = scores.split([len(cs) for cs in candidates])
    credit = [(s[0] == s.max()).item() / (s == s.max()).sum().item() for s in per_example]
    return sum(credit) / len(credit), sum(1 / len(cs) for cs in candidates) / len(candidates)


def forced_choice(model, suite, tasks, split_name, device, k, seed=0):
    """{task: {'accuracy', 'control', 'chance'}} of forced choice on each task's `split_name` split (the same
    candidates for every model), and its question-blind control: the same candidates, the same correct answer,
    scored after another example's question (blind_questions). knowledge = accuracy - control (knowledge_metrics)."""
    results = {}
    for task in tasks:
        split = suite[task][split_name]
        candidates = choice_candidates(split, k, seed)
        accuracy, chance = forced_choice_accuracy(model, split, candidates, device)
        control, _ = forced_choice_accuracy(model, split, candidates, device, blind_questions(split, seed))
        results[task] = {"accuracy": accuracy, "control": control, "chance": chance}
    return results


# ----------------------------------------------------------------------------------------------------------------
# the forgetting diagnostic


@torch.no_grad()
def forgetting_snapshot(model, saes, split, device, n_examples):
    """What the model does on a task's first n_examples evaluation inputs, kept to compare with later: per SAE
    point and per set of positions ("tokens": every content token; "answers": the answer positions alone, whose
    targets are the completion: what the head reads to answer) the residual stream x, the SAE's error x - xhat and
    the codes z (sparse); the task's mask m, built from the content tokens' codes as SAE-guided builds a mask
    (relevance, then propagation to decoder neighbours); the log-probabilities at the answer positions
    (teacher-forced); and the greedy answers."""
    was_training = model.training
    model.eval()
    batch = trim_padding(Batch(*(t.to(device) for t in split.rows(slice(0, n_examples)))))
    logits, _, residuals = model(batch.x, read=tuple(sorted(saes)))
    positions = {"tokens": batch.content_mask.bool(), "answers": batch.answer_mask.bool()}
    snapshot = {"points": {}, "mask": {}, "answers": greedy_answers(model, split, device, n_examples),
                "log_probs": torch.log_softmax(logits[positions["answers"]].double(), dim=-1)}
    for p, sae in saes.items():
        snapshot["points"][p] = {}
        for where, mask in positions.items():
            x = residuals[p][mask]  # (N, d)
            xhat, z = sae.reconstruct(x)
            snapshot["points"][p][where] = {"x": x, "error": x - xhat, "codes": z.to_sparse()}
        relevance = snapshot["points"][p]["tokens"]["codes"].to_dense().abs().mean(0)
        relevance = relevance / relevance.max().clamp(min=1e-12)
        snapshot["mask"][p] = propagate_mask(relevance, sae.W_dec)
    model.train(was_training)
    return snapshot


def drift_split(z, z_end, mask):
    """d_j = mean over tokens |z_j - z_end_j|, split by the mask m in [0, 1]:
        drift = sum_j d_j = sum_j m_j d_j (the task's features) + sum_j (1 - m_j) d_j (the rest).
    mask_mass = sum_j m_j: the two parts per feature are drift_mask / mask_mass and drift_rest / (d_sae - mask_mass)."""
    d = (z - z_end).abs().mean(0)
    return {"drift": d.sum().item(), "drift_mask": (mask * d).sum().item(), "drift_rest": ((1 - mask) * d).sum().item(),
            "mask_mass": mask.sum().item(), "features": len(mask)}


def stream_change(now, end):
    """How far the residual stream moved on the same tokens, relative to its size, and in which part: with
    x = xhat + e (what the SAE reconstructs, and its error) and size = mean_n ||x_end_n||,
        residual = mean_n ||x_n - x_end_n|| / size,  reconstruction = mean_n ||xhat_n - xhat_end_n|| / size,
        error = mean_n ||e_n - e_end_n|| / size,
    and the error's mean norm then and its change, error_norm_change = mean_n ||e_n|| - mean_n ||e_end_n||. A
    penalty on the codes sees the reconstruction only: the residual can move in the error without it. Each ratio is
    regularizers.relative_move, the one the error ablation's penalty holds."""
    def moved(a, b):
        return relative_move(a, b, end["x"]).item()

    return {"residual": moved(now["x"], end["x"]), "error": moved(now["error"], end["error"]),
            "reconstruction": moved(now["x"] - now["error"], end["x"] - end["error"]),
            "error_norm_end": end["error"].norm(dim=-1).mean().item(),
            "error_norm_change": (now["error"].norm(dim=-1).mean() - end["error"].norm(dim=-1).mean()).item()}


@torch.no_grad()
def answer_attribution(readout, sae, now, end, mask):
    """Which part of the stream's move at the last point (the one the head reads) moves the answers. The answer
    positions' stream then, x_end, is moved by one part of its move at a time and read by the current model's head,
    f(x) = log_softmax(lm_head(ln_f(x))); for each part, the mean over answer positions of KL(f(x_end) || f(x_end +
    part)), with the parts
        all = x - x_end,   error = e - e_end,   reconstruction = xhat - xhat_end = (z - z_end) W_dec / c,
        own = (m * (z - z_end)) W_dec / c,   rest = ((1 - m) * (z - z_end)) W_dec / c   (own + rest = reconstruction)
    for the task's mask m and the SAE's input scale c. The head is not linear, so the KLs do not add: a part whose
    KL is near all's carries the move; one near 0 does not."""
    x_end, dz = end["x"], now["codes"].to_dense() - end["codes"].to_dense()

    def decoded(dz):
        return dz @ sae.W_dec / sae.input_scale

    parts = {"all": now["x"] - x_end, "error": now["error"] - end["error"], "reconstruction": decoded(dz),
             "own": decoded(mask * dz), "rest": decoded((1 - mask) * dz)}

    def log_probs(x):
        return torch.log_softmax(readout(x).double(), dim=-1)

    log_p = log_probs(x_end)

    def kl(x):
        return (log_p.exp() * (log_p - log_probs(x))).sum(-1).mean().item()

    return {name: kl(x_end + part) for name, part in parts.items()}


def format_confusion(answers, own_formats, latest_formats):
    """The share of answers whose format (answer_format: character classes and length) is one of the latest
    task's formats and none of the task's own: an earlier task answered in the latest task's way."""
    foreign = set(latest_formats) - set(own_formats)
    return sum(answer_format(a) in foreign for a in answers) / max(1, len(answers))


def forgetting_diagnostic(end, now, own_formats, latest_formats, latest_mask=None, readout=None):
    """An earlier task's forgetting since it was learned, from its snapshot at that time (end) and now: per SAE
    point and set of positions ("tokens": every content token; "answers": the few that write the answer, which a
    mean over every token hides) the drift of the codes split into the task's mask and the rest (drift_split), and
    the stream_change (the residual's, and its parts: what the SAE reconstructs, and its error, which no SAE-space
    penalty sees); for the outputs the mean over answer positions of KL(p_end || p_now); and the format confusion
    of the greedy answers. With the latest task's masks ({point: m'}), mask_shared per point = sum_j m_j m'_j /
    sum_j m_j: how much of the task's mask the latest task's mask covers (features a mask frees while that task is
    learned). With readout = (point, its SAE, the current model's head x -> logits) at the last point, the
    answer_attribution of the answers' move to the parts of the stream's."""
    points = {}
    for p, sets in end["points"].items():
        points[p] = {where: drift_split(now["points"][p][where]["codes"].to_dense(), snap["codes"].to_dense(),
                                        end["mask"][p]) | stream_change(now["points"][p][where], snap)
                     for where, snap in sets.items()}
    kl = (end["log_probs"].exp() * (end["log_probs"] - now["log_probs"])).sum(-1).mean().item()
    result = {"points": points, "answer_kl": kl,
              "format_confusion": format_confusion(now["answers"], own_formats, latest_formats)}
    if latest_mask is not None:
        result["mask_shared"] = {p: ((m * latest_mask[p]).sum() / m.sum().clamp(min=1e-12)).item()
                                 for p, m in end["mask"].items()}
    if readout is not None:
        p, sae, head = readout
        result["answer_attribution"] = answer_attribution(head, sae, now["points"][p]["answers"],
                                                          end["points"][p]["answers"], end["mask"][p])
    return result


# ----------------------------------------------------------------------------------------------------------------
# SAE metrics


def l0(z):
    """Mean number of nonzero latents per token: (1/N) sum_n |{j : z_nj != 0}|."""
    return (z != 0).float().sum(-1).mean().item()


def fvu(x, xhat):
    """Fraction of variance unexplained: sum ||x - xhat||^2 / sum ||x - mean(x)||^2 (a ratio of sums)."""
    return ((x - xhat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def second_moment_split(x):
    """x: (tokens, d). E||x||^2 = ||mu||^2 + E||x - mu||^2, mu = E[x] over tokens: the constant part of the
    residual stream (the same vector at every token) and the part that varies from token to token.
    Returns {'rms': sqrt(E||x||^2), 'mean_share': ||mu||^2 / E||x||^2, 'centered_rms': sqrt(E||x - mu||^2)}."""
    x = x.double()
    mu = x.mean(0)
    second = (x * x).sum(-1).mean()
    centered = ((x - mu) ** 2).sum(-1).mean()
    return {"rms": second.sqrt().item(), "mean_share": (mu @ mu / second).item(),
            "centered_rms": centered.sqrt().item()}


@torch.no_grad()
def sae_metrics(model, saes, ids, block_size, device, n_batches=20, batch_size=32, seed=1234):
    """Metrics of {point: sae} on fixed random windows of held-out ids.

    Per point: L0 and FVU (the functions above), explained variance (1 - FVU), dead fraction (latents that never
    fire on these tokens), mean cosine(x, xhat), the activations' own second_moment_split (rms, mean_share,
    centered_rms), and CE increase = CE(model with that point's reconstruction spliced in) - CE(model). For the
    whole set: compound CE increase, every point spliced at once (each SAE reads the already-patched stream).
    Losses are in nats per token."""
    from data.corpus import get_batch

    model.eval()
    points = sorted(saes)
    generator = torch.Generator().manual_seed(seed)
    acts = {p: {"x": [], "xhat": [], "l0": [], "cos": [], "ce": []} for p in points}
    fired = {p: torch.zeros(saes[p].config.d_sae, dtype=torch.bool, device=device) for p in points}
    clean_ce, compound_ce = [], []
    for _ in range(n_batches):
        x, y = get_batch(ids, batch_size, block_size, generator, device)
        _, loss, residuals = model(x, y, read=points)
        clean_ce.append(loss.item())
        compound_ce.append(model(x, y, patch=dict(saes))[1].item())
        for p in points:
            act = residuals[p].reshape(-1, residuals[p].size(-1))
            xhat, z = saes[p].reconstruct(act)
            a = acts[p]
            a["x"].append(act.double().cpu())
            a["xhat"].append(xhat.double().cpu())
            a["l0"].append(l0(z))  # every batch has the same number of tokens: the mean of means is the mean
            a["cos"].append(torch.nn.functional.cosine_similarity(act, xhat, dim=-1).mean().item())
            a["ce"].append(model(x, y, patch={p: saes[p]})[1].item())
            fired[p] |= (z > 0).any(0)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    results = {"clean_ce": mean(clean_ce), "compound_ce_increase": mean(compound_ce) - mean(clean_ce),
               "total_l0": 0.0, "points": {}}
    for p in points:
        a = acts[p]
        point = {"l0": mean(a["l0"]), "fvu": fvu(torch.cat(a["x"]), torch.cat(a["xhat"])), "cos": mean(a["cos"]),
                 "dead_fraction": 1.0 - fired[p].float().mean().item(), "ce_increase": mean(a["ce"]) - mean(clean_ce)}
        point["explained_variance"] = 1.0 - point["fvu"]
        point.update(second_moment_split(torch.cat(a["x"])))  # of the model's activations, not of the SAE
        results["points"][p] = point
        results["total_l0"] += point["l0"]
    return results


# ----------------------------------------------------------------------------------------------------------------
# continual-learning metrics
#
# R has T + 1 rows: R[0] before any task, R[t] after training task t (tasks numbered 1..T); column i-1 is task i.

def cl_metrics(R):
    """OP, plasticity, BWT and forgetting from an accuracy matrix (list of rows); see the equations below."""
    R = torch.tensor(R, dtype=torch.float64)
    T = R.size(0) - 1
    final = R[T]
    metrics = {"op": final.mean().item()}  # OP = (1/T) sum_i R[T][i]
    if T < 2 or R.size(1) != T:  # multitask has one row after training: only OP is defined
        return {**metrics, "plasticity": None, "bwt": None, "forgetting": None, "forgetting_per_task": None}
    learned = torch.stack([R[i + 1, i] for i in range(T)])  # R[i][i]: task i right after learning it
    metrics["plasticity"] = learned.mean().item()  # (1/T) sum_i R[i][i]
    metrics["bwt"] = (final[: T - 1] - learned[: T - 1]).mean().item()  # (1/(T-1)) sum_{i<T} (R[T][i] - R[i][i])
    # forgetting_i = max_{t<T} R[t][i] - R[T][i], over the rows after task i was learned, for i < T
    forgetting = [(R[i + 1 : T, i].max() - final[i]).item() for i in range(T - 1)]
    metrics["forgetting_per_task"] = forgetting
    metrics["forgetting"] = sum(forgetting) / len(forgetting)
    return metrics


def knowledge_metrics(run, base):
    """What one run's final model keeps of the earlier tasks i < T (every task but the last), each a mean over
    those tasks, every task counted once whatever its size, beside the control it is read against:

        exact_match        = mean_i R[T][i]
        constant_guess     = mean_i (exact match of always giving task i's most frequent training answer)
        forced_choice      = mean_i (forced-choice accuracy on task i), over the tasks i that have distractors
        choice_control     = the same with each example's candidates scored after another example's question
        knowledge          = forced_choice - choice_control (0 for a model that knows answer priors only)
        relearn@n          = mean_i acc_i(final model + n steps of fine-tuning on task i alone)
        kept@n             = relearn@n(this run) - relearn@n(the base model, same seed and steps)
        shuffled@n         = mean_i acc_i(final model + n steps on task i with its answers shuffled among its
                             examples), scored on the true answers: what re-teaching the format alone gives back
        content_kept@n     = relearn@n - shuffled@n (0 for a model that holds the tasks' format only)

    base: the base model's result of the same seed (train.base_reference), or None (no kept@n)."""
    earlier = run["tasks"][:-1]
    if not earlier:  # one task: nothing learned before the last
        return {}
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    metrics = {"exact_match": mean(run["R"][-1][:-1])}
    if run.get("constant_guess"):
        metrics["constant_guess"] = mean([run["constant_guess"][t]["accuracy"] for t in earlier])
    choice = run.get("forced_choice") or {}
    choosable = [t for t in earlier if t in choice and choice[t]["chance"] < 1]  # a task with no distractor: no choice
    if choosable:
        metrics["forced_choice"] = mean([choice[t]["accuracy"] for t in choosable])
        metrics["forced_choice_chance"] = mean([choice[t]["chance"] for t in choosable])
        if all("control" in choice[t] for t in choosable):
            metrics["choice_control"] = mean([choice[t]["control"] for t in choosable])
            metrics["knowledge"] = metrics["forced_choice"] - metrics["choice_control"]
    if run.get("relearn"):
        for j, n in enumerate(run["relearn_steps"]):
            metrics[f"relearn@{n}"] = mean([run["relearn"][t][j] for t in earlier])
            if run.get("relearn_shuffled"):
                metrics[f"shuffled@{n}"] = mean([run["relearn_shuffled"][t][j] for t in earlier])
                metrics[f"content_kept@{n}"] = metrics[f"relearn@{n}"] - metrics[f"shuffled@{n}"]
            if base is not None:
                metrics[f"kept@{n}"] = metrics[f"relearn@{n}"] - knowledge_metrics(base, None)[f"relearn@{n}"]
    return metrics
