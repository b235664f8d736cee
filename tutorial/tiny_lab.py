"""
tutorial/tiny_lab.py: the EKSFT paper's experiment in miniature, on a laptop CPU, as a fair comparison.

    python tutorial/tiny_lab.py --quick                # the whole pipeline, small (CI runs it)
    python tutorial/tiny_lab.py --regime paper --seeds 3 --jobs 3 --output-dir runs/paper   # the lab
    python tutorial/tiny_lab.py --regime paper --seeds 3 --jobs 3 --output-dir runs/paper-ek \\
        --eksft-args "--ratio 0.4 --combine intersection"                                   # an exercise

The plan: five stages, each under its banner below, in this order (tutorial/README.md is the
lesson that goes with it; run_seed runs stages 1 to 4 for each seed on its own, then the report):
  1. Pre-train a small Qwen2-architecture model (character tokenizer) on arithmetic word problems
     written as plain prose, until its prose skill on validation questions stops moving (the
     convergence rule in `converged`), then cool the learning rate down. Each seed has its own
     base (its own initial weights and data order), so the spread over seeds includes the base's.
  2. Tune each method the same way: SFT, DFT and EKSFT (eksft.py --method), each at every learning
     rate of the grid, a checkpoint after every epoch; the checkpoint with the most validation
     questions right is the method's model (ties: fewer steps, then the smaller learning rate).
  3. The same GRPO (rl.train) from each method's selected model.
  4. Measure the base and every model (evaluate.evaluate_model, eksft.token_statistics): greedy
     held-out accuracy, pass@k with sampling, KL(model || base) per token, entropy, prose skill.
  5. One report: per-seed values beside every mean, a paired bootstrap interval for each
     difference (questions and seeds resampled), whether RL lowered held-out accuracy, the plan
     and the real wall time, the package versions.

Three disjoint question sets: the SFT set, the validation set (stages 1-2 choose with it) and the
held-out set (only stage 4 sees it); the RL questions are none of them. The regimes (--regime):
  lesson  SFT data: data.py's synthetic chat examples (2-3 steps); held-out: data.py's held-out
          questions (same generator, another seed).
  paper   the paper's setting in miniature. The base has seen the format (--format-docs defaults
          to 0.05) and answers some held-out questions; the SFT set is small and written in another,
          wordier style (each step followed by "Check: ...", then "So <name> has N <item> now."),
          with 2-3 step problems whose numbers are all <= 40; the held-out and validation problems
          are harder than any SFT example (3 steps, answer > 40).

Everything is imported from data.py, eksft.py, rl.py and evaluate.py: this file adds the
pre-training loop, the prose corpus, the selection, the statistics and the report, nothing else.

Simplifications (this is a miniature, not a replication):
  1. The "pre-trained distribution" is one task in prose, not the web; the model has 0.8M
     parameters and a character vocabulary (259 tokens), not 8B parameters and 152k tokens.
  2. A seed changes the base's initial weights and data order, the SFT sample, the RL questions
     and all sampling; the pre-training corpus, the validation and the held-out questions are the
     same for every seed (none of them in the corpus).
  3. The tuning grid is small (3 learning rates x the epochs): the same budget for every method,
     not an exhaustive search. RL is not tuned: the same settings from every selected model.
  4. Numbers are reproducible: the same command on the same machine gives the same table
     (tests/test_tutorial.py checks it). torch runs --threads threads (default 1, recorded);
     another thread count, CPU or torch version may change the numbers.
  5. Each base is saved in OUTPUT_DIR/seedN/base and reused by a later run with the same
     pre-training settings (--bases DIR reuses another run's); everything after it is recomputed.
"""
import argparse
import datetime
import functools
import json
import math
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import sys
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules live one directory up

import torch  # noqa: E402

import data  # noqa: E402
import eksft  # noqa: E402
import evaluate  # noqa: E402
import rl  # noqa: E402

# -----------------------------------------------------------------------------
# Settings: the full run and --quick (same pipeline, smaller everywhere)

FULL = dict(
    hidden_size=128, num_layers=4,                       # 0.82M parameters
    # pre-training: warmup, a constant learning rate until the validation prose skill has
    # converged (or pretrain_max_steps), then a linear cooldown of pretrain_cooldown x the steps so far.
    # The rule may fire only from pretrain_min_steps on: early on the skill sits at 0% for several
    # evaluations (1,000-1,250 steps in three bases here), a plateau that is not the end of learning
    pretrain_problems=8000, pretrain_batch=8, block_size=256, pretrain_lr=3e-3, pretrain_warmup=100,
    pretrain_eval_every=250, pretrain_patience=4, pretrain_tolerance=0.04, pretrain_min_steps=2000,
    pretrain_max_steps=5000, pretrain_cooldown=0.2,
    # tuning: every method at every learning rate, a checkpoint per epoch, chosen on validation
    sft_examples=64, sft_epochs=4, sft_batch=16, sft_lrs=(5e-5, 2e-4, 1e-3), val_questions=64,
    rl_steps=20, rl_prompts=16, rl_group=8, rl_lr=2e-4, temperature=1.0,
    eval_questions=128, pass_questions=16, pass_samples=8, max_new_tokens=170, text_examples=64,
    format_docs=0.0,
)
QUICK = dict(FULL, pretrain_problems=1000, pretrain_warmup=10, pretrain_eval_every=20,
             pretrain_patience=2, pretrain_min_steps=0, pretrain_max_steps=60, sft_examples=32, sft_epochs=2,
             val_questions=8, rl_steps=2, rl_prompts=4, rl_group=4, rl_lr=5e-4, eval_questions=16,
             pass_questions=4, pass_samples=4, max_new_tokens=100, text_examples=8)
PAPER = dict(  # the paper regime's changes to FULL
    max_new_tokens=260,                # the checked style is longer: a 3-step answer is ~230 characters
    sft_examples=256,                  # 64 examples left SFT half-way between two styles
)
METHODS = ("sft", "dft", "eksft")   # eksft.py --method values this lab compares (if eksft.py has them)
NAMES = {"sft": "SFT", "dft": "DFT", "eksft": "EKSFT"}
HELD_OUT_SEED = 10_000      # data.load_qa("synthetic") draws the held-out questions with this seed
VALIDATION_SEED = 30_000    # the validation questions: drawn like the held-out ones, another seed
PRETRAIN_SEED = 123_456     # the prose corpus: a seed no other set uses
RL_SEED = 200_000           # RL questions of seed s: data.synthetic_problems(2000, seed=RL_SEED + s)
SFT_MAX_NUMBER = 40         # paper regime: every number in an SFT example is <= 40, every held-out answer > 40
# seconds per unit of work for one process with one torch thread, from the stage times the lab
# logged on 2 cores of an AMD EPYC (9 processes sharing them: divided by 4.5); --quick on a 2-core
# Intel Xeon took about half of what they plan for it, and one reader's CPU was 2.5x slower
COST = dict(pretrain_step=0.3,    # 8 x 256 tokens, forward and backward
            sft_example=0.1,      # one training example, one epoch (EKSFT: with the reference pass)
            eval_token=0.0004,    # one greedy or sampled token of one sequence, in batches of 16-128
            rl_token=0.0005,      # one rollout token (--max-new-tokens slots), with the update
            load=1.0)             # loading a model, starting a run


def offered_methods(log=print):
    """The METHODS eksft.py's --method accepts here; a method it lacks is skipped with a warning."""
    offered = []
    for method in METHODS:
        try:
            eksft.parse_args(["--method", method])     # a choice it lacks is a UserError
            offered.append(method)
        except data.UserError:
            log(f"warning: eksft.py has no --method {method}; the lab runs without {NAMES[method]}")
    return offered


# -----------------------------------------------------------------------------
# 1. Pre-training: the skill in plain prose, without the answer format


def prose(problem):
    """A synthetic problem as plain text: question, worked steps, and the result in words.

    No chat template, no \\boxed{}, no "The answer is" (the answer checker would accept that):
    the base model learns to do the arithmetic but not to present an answer the checker reads."""
    name, item = re.match(r"(\w+) has \d+ (\w+)\.", problem["question"]).groups()
    steps = problem["solution"].rsplit(" The answer is", 1)[0]
    return f"{problem['question']} {steps} So {name} has {problem['answer']} {item} now."


def num_steps(problem):
    return problem["question"].count(" Then ")


def pretraining_problems(cfg):
    """The corpus's problems: data.py's generator with its own seed, minus the lesson's held-out
    questions (the validation questions and the paper regime's held-out ones are chosen outside
    this corpus instead)."""
    lesson_held_out = {q["question"] for q in data.load_qa("synthetic", limit=cfg["eval_questions"])}
    return [p for p in data.synthetic_problems(cfg["pretrain_problems"], seed=PRETRAIN_SEED)
            if p["question"] not in lesson_held_out]


def like_held_out(problems, regime, exclude):
    """The problems of the held-out kind not in `exclude`: any for lesson; 3 steps and an answer
    above SFT_MAX_NUMBER for paper (harder than every SFT example)."""
    return [p for p in problems if p["question"] not in exclude
            and (regime == "lesson" or (num_steps(p) == 3 and int(p["answer"]) > SFT_MAX_NUMBER))]


def held_out_problems(cfg, regime):
    """The held-out problems with their worked solutions; none is in the pre-training corpus.

    lesson: the first n of data.load_qa("synthetic"). paper: the first n of the held-out kind."""
    n = cfg["eval_questions"]
    if regime == "lesson":
        problems = data.synthetic_problems(n, seed=HELD_OUT_SEED)
        assert [p["question"] for p in problems] == [q["question"] for q in data.load_qa("synthetic", limit=n)]
        return problems
    seen = {p["question"] for p in data.synthetic_problems(cfg["pretrain_problems"], seed=PRETRAIN_SEED)}
    return like_held_out(data.synthetic_problems(40 * n, seed=HELD_OUT_SEED), regime, seen)[:n]


def validation_problems(cfg, regime, held_out):
    """The validation set: held-out-like problems from their own seed, in neither the corpus nor
    the held-out set (write_data keeps them out of the SFT and RL sets)."""
    n = cfg["val_questions"]
    exclude = ({p["question"] for p in data.synthetic_problems(cfg["pretrain_problems"], seed=PRETRAIN_SEED)}
               | {p["question"] for p in held_out})
    return like_held_out(data.synthetic_problems(40 * n, seed=VALIDATION_SEED), regime, exclude)[:n]


def pretraining_documents(cfg, tokenizer):
    """The corpus: every problem as prose, except that with format_docs = F > 0 one document in
    round(1/F) is a chat example with a \\boxed answer instead, as real base models have seen some
    instruction data."""
    every = round(1 / cfg["format_docs"]) if cfg["format_docs"] else 0
    documents = []
    for i, p in enumerate(pretraining_problems(cfg)):
        if every and i % every == 0:
            messages = data.row_to_messages({"problem": p["question"], "solution": p["solution"]}, "pre-training")
            documents.append(data.render(tokenizer, messages).rstrip("\n"))
        else:
            documents.append(prose(p))
    return documents


def converged(scores, patience, tolerance):
    """The convergence rule, early stopping's: none of the last `patience` evaluations beat the best
    score before them by more than `tolerance`. Not "the last scores lie close together": 64
    validation questions score a 60% model with a standard deviation of 6 points, so a trained
    base's scores scatter by more than any small tolerance (one run here read 70, 64, 58, 62, 52),
    while a plateau on the way up (11, 11, 11 before 28) can look flat.
    [0.5, 0.7, 0.72, 0.7, 0.66] with patience 3, tolerance 0.04: converged (0.72 <= 0.5 + 0.04 is
    false, but 0.7 was reached before the last 3, and none of them beats 0.7 + 0.04)."""
    if len(scores) <= patience:
        return False
    best_before = max(scores[:-patience])
    return max(scores[-patience:]) <= best_before + tolerance + 1e-12


def pretrain_lr(step, cfg, cooldown_start=None, cooldown_steps=0):
    """Warmup, constant, cooldown: linear warmup over pretrain_warmup steps, then pretrain_lr until
    the convergence rule fires at cooldown_start, then a linear decay to 0 over cooldown_steps.
    (A cosine would need the number of steps in advance; the rule decides it as training goes.)"""
    peak = cfg["pretrain_lr"]
    if cooldown_start is not None:
        return peak * max(0.0, 1 - (step - cooldown_start) / cooldown_steps)
    return peak * min(1.0, (step + 1) / cfg["pretrain_warmup"])


def pretrain(cfg, tokenizer, device, seed, val_problems, log=print):
    """Train a fresh tiny Qwen2 (initial weights and data order from `seed`) on packed prose with
    plain next-token cross-entropy, until the prose skill on `val_problems` has converged.

    The loss is eksft_loss_lean with ratio 0 and both lambdas 0 and labels = input_ids: that is
    exactly cross-entropy on every next token (the "response" is the whole text). Returns the model
    and the curve: {"step", "loss", "lr"} per step and {"step", "prose_accuracy"} per evaluation,
    and whether the rule fired before pretrain_max_steps."""
    model = eksft.tiny_model(tokenizer, seed=seed, hidden_size=cfg["hidden_size"],
                             num_layers=cfg["num_layers"]).to(device)
    documents = pretraining_documents(cfg, tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    stream = [t for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]
              for t in ids + newline]                                   # documents joined by "\n"
    block = cfg["block_size"]
    rows = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)   # (R, block)
    log(f"pre-train: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(documents)} documents, {len(stream) / 1e6:.2f}M tokens in {len(rows)} rows of "
        f"{block}; batches of {cfg['pretrain_batch']} rows; prose skill on {len(val_problems)} "
        f"validation questions every {cfg['pretrain_eval_every']} steps, stop when none of the "
        f"last {cfg['pretrain_patience']} beats the best before them by {cfg['pretrain_tolerance']:g}"
        f" (from step {cfg['pretrain_min_steps']}, at most {cfg['pretrain_max_steps']} steps), then "
        f"cool down over {cfg['pretrain_cooldown']:g} x the steps")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["pretrain_lr"], betas=(0.9, 0.95),
                                  weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses, evals = [], []
    cooldown_start, cooldown_steps, is_converged = None, 0, False
    step, total = 0, cfg["pretrain_max_steps"]
    while step < total:
        lr = pretrain_lr(step, cfg, cooldown_start, cooldown_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        batch = rows[torch.randint(len(rows), (cfg["pretrain_batch"],), generator=generator)].to(device)
        logits = model(input_ids=batch).logits                                 # (B, block, V)
        loss, _ = eksft.eksft_loss_lean(logits, batch, ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append({"step": step, "loss": loss.item(), "lr": lr})
        in_cooldown = cooldown_start is not None
        if step == total or (not in_cooldown and step % cfg["pretrain_eval_every"] == 0):
            model.eval()
            score = prose_accuracy(model, tokenizer, val_problems, min(cfg["max_new_tokens"], 170))
            evals.append({"step": step, "prose_accuracy": score, "cooldown": in_cooldown})
            log(f"pre-train step {step:5d} | loss {loss.item():.4f} | lr {lr:.2e} | validation "
                f"prose skill {100 * score:.1f}%" + (" (after the cooldown)" if in_cooldown else ""))
            stable = [e["prose_accuracy"] for e in evals if not e["cooldown"]]
            if not in_cooldown:
                is_converged = step >= cfg["pretrain_min_steps"] and converged(
                    stable, cfg["pretrain_patience"], cfg["pretrain_tolerance"])
                if is_converged or step == total:   # the cap: cool down anyway, and say so
                    cooldown_start, cooldown_steps = step, max(1, round(cfg["pretrain_cooldown"] * step))
                    total = step + cooldown_steps
                    log(f"pre-train: {'converged' if is_converged else 'NOT converged (the step cap)'} "
                        f"at step {step}; cooldown to step {total}")
    return model.eval(), {"losses": losses, "evals": evals, "converged": is_converged,
                          "steps": step}


def base_settings(cfg, seed):
    """What a base depends on: a saved base is reused only if these match."""
    keys = ("hidden_size", "num_layers", "pretrain_problems", "pretrain_batch", "block_size",
            "pretrain_lr", "pretrain_warmup", "pretrain_eval_every", "pretrain_patience",
            "pretrain_tolerance", "pretrain_min_steps", "pretrain_max_steps", "pretrain_cooldown", "format_docs",
            "val_questions", "max_new_tokens")
    return {k: cfg[k] for k in keys} | {"pretrain_seed": PRETRAIN_SEED, "held_out": cfg["eval_questions"],
                                        "regime": cfg["regime"], "seed": seed}


def get_base(cfg, seed, seed_dir, val_problems, device, bases_from=None):
    """Seed `seed`'s pre-trained base as a directory (eksft.py and rl.py load models from
    directories) and its pre-training record: BASES/seedN/base (--bases) or else seed_dir/base when
    its settings match this run's, pre-trained into seed_dir/base otherwise."""
    base_dir = os.path.join(seed_dir, "base")
    sources = ([os.path.join(bases_from, f"seed{seed}", "base")] if bases_from else []) + [base_dir]
    for source in sources:
        record_path = os.path.join(source, "pretrain.json")
        if os.path.exists(record_path):
            with open(record_path) as f:
                record = json.load(f)
            if record["settings"] == base_settings(cfg, seed):
                print(f"base: reusing {source} (same pre-training settings; delete it to pre-train again)")
                return source, record | {"reused": True}
            print(f"base: {source} has other pre-training settings than this run's; not reused")
    tokenizer = eksft.char_tokenizer()
    start = time.perf_counter()
    model, curve = pretrain(cfg, tokenizer, device, seed, val_problems)
    shutil.rmtree(base_dir, ignore_errors=True)
    os.makedirs(base_dir)
    eksft.export_model(base_dir, model, tokenizer, {"stage": "pre-train"} | base_settings(cfg, seed))
    record = {"settings": base_settings(cfg, seed), "curve": curve,
              "seconds": round(time.perf_counter() - start, 1)}
    eksft.write_json(os.path.join(base_dir, "pretrain.json"), record)
    return base_dir, record | {"reused": False}


# -----------------------------------------------------------------------------
# 2. SFT, DFT and EKSFT from the base, each tuned the same way, through eksft.py's own loop


def checked_solution(problem):
    """The paper regime's SFT style: data.py's steps, each followed by a check, then a summary
    sentence and the answer (wordier than the base's own chat answers, with the same arithmetic).

    "Ava starts with 5 apples. After doubling: 5 * 2 = 10. After giving away 3: 10 - 3 = 7. ..." becomes
    "Ava starts with 5 apples. After doubling: 5 * 2 = 10. Check: 10 / 2 = 5. After giving away 3:
     10 - 3 = 7. Check: 7 + 3 = 10. So Ava has 7 apples now. The answer is \\boxed{7}.\""""
    name, item = re.match(r"(\w+) has \d+ (\w+)\.", problem["question"]).groups()
    inverse = {"+": "-", "-": "+", "*": "/"}
    steps = re.sub(r"(\d+) ([-+*]) (\d+) = (\d+)\.",            # "a op b = c." -> "... Check: c op' b = a."
                   lambda m: f"{m[0]} Check: {m[4]} {inverse[m[2]]} {m[3]} = {m[1]}.",
                   problem["solution"].rsplit(" The answer is", 1)[0])
    return f"{steps} So {name} has {problem['answer']} {item} now. The answer is \\boxed{{{problem['answer']}}}."


def write_data(cfg, regime, seed, excluded_problems, seed_dir):
    """One seed's data files: the SFT set and the RL questions, in seed_dir; neither holds a
    question of `excluded_problems` (the held-out and the validation sets).

    SFT, lesson: data.py's synthetic chat examples (the first sft_examples of its seed + 1 pool).
    SFT, paper: 2-3 step problems whose numbers are all <= SFT_MAX_NUMBER, in the checked style.
    RL: questions of the same generator drawn with another seed (2-3 steps, the pre-training
    distribution), none of them an SFT, validation or held-out question."""
    excluded = {p["question"] for p in excluded_problems}
    pool = [p for p in data.synthetic_problems(20 * cfg["sft_examples"], seed=seed + 1)   # data.py's SFT pool
            if p["question"] not in excluded]
    if regime == "lesson":
        sft_rows = [{"problem": p["question"], "solution": p["solution"]} for p in pool[:cfg["sft_examples"]]]
    else:
        easy = [p for p in pool if max(int(x) for x in re.findall(r"\d+", p["solution"])) <= SFT_MAX_NUMBER]
        sft_rows = [{"problem": p["question"], "solution": checked_solution(p)} for p in easy[:cfg["sft_examples"]]]
    excluded |= {r["problem"] for r in sft_rows}
    rl_rows = [{"question": p["question"], "answer": p["answer"]}
               for p in data.synthetic_problems(2000, seed=RL_SEED + seed) if p["question"] not in excluded]
    os.makedirs(seed_dir, exist_ok=True)
    paths = {"sft": os.path.join(seed_dir, "sft_data.jsonl"), "rl": os.path.join(seed_dir, "rl_data.jsonl")}
    for key, rows in (("sft", sft_rows), ("rl", rl_rows)):
        with open(paths[key], "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return paths


def steps_per_epoch(cfg):
    return cfg["sft_examples"] // cfg["sft_batch"]       # eksft.py drops the last partial step


def sft_args(cfg, base_dir, sft_data, out_dir, seed, method, lr, device, extra=(), show_mask=0):
    """eksft.py command-line arguments for one run of the grid: a checkpoint after every epoch."""
    argv = ["--model", base_dir, "--data", sft_data, "--num-samples", str(cfg["sft_examples"]),
            "--max-len", "512", "--epochs", str(cfg["sft_epochs"]), "--batch-size", str(cfg["sft_batch"]),
            "--micro-batch-size", str(cfg["sft_batch"]), "--lr", f"{lr:g}", "--warmup", "0.1",
            "--seed", str(seed), "--output-dir", out_dir, "--save-every", str(steps_per_epoch(cfg)),
            "--keep-checkpoints", "0", "--log-every", str(steps_per_epoch(cfg)), "--device", device,
            "--method", method]
    return argv + (["--show-mask", str(show_mask)] + list(extra) if method == "eksft" else [])


class Candidate(NamedTuple):
    """One checkpoint of the tuning grid and its validation score."""
    method: str
    lr: float
    step: int
    path: str
    val_correct: int      # validation questions answered right (greedy)
    val_questions: int


def select(candidates):
    """The candidate with the most validation questions right; ties go to fewer steps, then to the
    smaller learning rate (the one that moved least from the base)."""
    return max(candidates, key=lambda c: (c.val_correct, -c.step, -c.lr))


def checkpoints(run_dir):
    """(step, path) of every checkpoint in run_dir, by step."""
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(run_dir) if re.fullmatch(r"checkpoint-\d+", d))
    return [(s, os.path.join(run_dir, f"checkpoint-{s}")) for s in steps]


def validation_correct(model_dir, problems, cfg, device):
    """Greedy answers to the validation questions: how many are right."""
    model, tokenizer = eksft.load_model_and_tokenizer(model_dir, device)
    rows, _ = evaluate.evaluate_model(model.eval(), tokenizer, problems, max_new_tokens=cfg["max_new_tokens"],
                                      batch_size=len(problems), progress=False)
    return sum(bool(r["correct"]) for r in rows)


def tune(cfg, method, base_dir, sft_data, seed_dir, seed, device, val_problems, extra, show_mask):
    """Train `method` at every learning rate of the grid, score every checkpoint on validation,
    keep the selected one and delete the others. Returns (selected, all candidates, argv of the
    selected run)."""
    candidates, argvs = [], {}
    for lr in cfg["sft_lrs"]:
        run_dir = os.path.join(seed_dir, f"{method}-lr{lr:g}")
        argvs[lr] = sft_args(cfg, base_dir, sft_data, run_dir, seed, method, lr, str(device), extra,
                             show_mask if lr == cfg["sft_lrs"][-1] else 0)
        banner(f"seed {seed}: {NAMES[method]} at lr {lr:g}  (python eksft.py {shlex.join(argvs[lr])})")
        eksft.train(eksft.parse_args(argvs[lr]))
        for step, path in checkpoints(run_dir):
            correct = validation_correct(path, val_problems, cfg, device)
            candidates.append(Candidate(method, lr, step, path, correct, len(val_problems)))
            print(f"validation: {NAMES[method]} lr {lr:g} step {step}: {correct} of {len(val_problems)} right")
    best = select(candidates)
    print(f"selected: {NAMES[method]} lr {best.lr:g} step {best.step} ({best.val_correct} of "
          f"{best.val_questions} validation questions)")
    for c in candidates:   # the grid's other checkpoints are not used again
        if c.path != best.path:
            shutil.rmtree(c.path, ignore_errors=True)
    return best, candidates, argvs[best.lr]


# -----------------------------------------------------------------------------
# 3. GRPO from each selected model, through rl.py's own loop


def rl_args(cfg, model_dir, rl_data, out_dir, seed, device):
    # the reward reads answers as the measure does: builtin checker, a stated answer only
    return ["--model", model_dir, "--data", rl_data, "--reward", "math", "--checker", "builtin",
            "--strict-reward", "--output-dir", out_dir,
            "--max-steps", str(cfg["rl_steps"]), "--group-size", str(cfg["rl_group"]),
            "--prompts-per-step", str(cfg["rl_prompts"]), "--max-new-tokens", str(cfg["max_new_tokens"]),
            "--lr", str(cfg["rl_lr"]), "--temperature", str(cfg["temperature"]), "--micro-batch-size", "32",
            "--eval-size", "0", "--seed", str(seed),
            "--save-every", "0", "--keep-checkpoints", "1", "--print-every", "0",
            "--log-every", str(max(1, cfg["rl_steps"] // 5)), "--device", device]


# -----------------------------------------------------------------------------
# 4. Measures: accuracy and pass@k (evaluate.py), entropy and KL on held-out text (eksft.py)


@torch.no_grad()
def text_statistics(model, base, examples, pad_id, device, batch_size=32):
    """Mean entropy H of `model` and mean KL(model || base) per trained token of `examples`.

    The numbers come from eksft.token_statistics, the very function EKSFT selects tokens with:
        H_t = -sum_v p(v) log p(v),   KL_t = sum_v p(v) (log p(v) - log q(v)),   q = the base."""
    sums = {"entropy": 0.0, "kl": 0.0, "tokens": 0}
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in data.collate(examples[s:s + batch_size], pad_id).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        entropy, kl = eksft.token_statistics(model(**inputs).logits, batch["labels"],
                                             base(**inputs).logits)     # (B, T-1) each, 0 off-target
        sums["entropy"] += entropy.sum().item()
        sums["kl"] += kl.sum().item()
        sums["tokens"] += int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
    return sums["entropy"] / sums["tokens"], sums["kl"] / sums["tokens"]


def held_out_texts(tokenizer, problems):
    """Two held-out texts per problem: the prose of pre-training (every token scored) and the chat
    example in data.py's style (assistant tokens scored, as in training)."""
    prose_ids = tokenizer([prose(p) for p in problems], add_special_tokens=False)["input_ids"]
    conversations = [(f"held-out {i}", data.row_to_messages(
        {"problem": p["question"], "solution": p["solution"]}, f"held-out {i}")) for i, p in enumerate(problems)]
    return {"prose": [{"input_ids": ids, "labels": ids} for ids in prose_ids],
            "chat": data.build_sft_examples(tokenizer, conversations, 512, log=lambda *_: None)}


def prose_correct(model, tokenizer, problems, max_new_tokens):
    """The skill in the pre-training format: greedy continuation of the bare question (no chat
    template), scored by the number in its first "So <name> has <N>" sentence; 1 or 0 per problem."""
    prompts = [tokenizer(p["question"] + " ", add_special_tokens=False)["input_ids"] for p in problems]
    outputs = rl.generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    found = [re.search(r"So \w+ has (\d+)", o["text"]) for o in outputs]
    return [int(m is not None and m.group(1) == p["answer"]) for m, p in zip(found, problems)]


def prose_accuracy(model, tokenizer, problems, max_new_tokens):
    return sum(prose_correct(model, tokenizer, problems, max_new_tokens)) / len(problems)


def sampled_metrics(model, tokenizer, problems, cfg, seed):
    """pass@k from cfg["pass_samples"] samples per question at cfg["temperature"], scored with
    evaluate.py's rows and metrics. All samples come from one seeded generate call (evaluate_model
    samples one question per call, which is slow for a tiny model on a CPU)."""
    n = cfg["pass_samples"]
    prompts = [data.encode_prompt(tokenizer, p["question"]) for p in problems for _ in range(n)]
    outputs = rl.generate_completions(model, tokenizer, prompts, max_new_tokens=cfg["max_new_tokens"],
                                      temperature=cfg["temperature"], seed=seed)
    rows = [evaluate.score_row(i // n, i % n, problems[i // n], out, "builtin") for i, out in enumerate(outputs)]
    return evaluate.metrics_from_rows(rows)


def measure(model_dir, base, cfg, problems, texts, seed, device):
    """All the measures of one model: a flat dict of numbers, the per-question results (1 right,
    0 wrong) for the paired statistics, and the greedy answer to the first question."""
    model, tokenizer = eksft.load_model_and_tokenizer(model_dir, device)
    model.eval()
    rows, greedy = evaluate.evaluate_model(model, tokenizer, problems, max_new_tokens=cfg["max_new_tokens"],
                                           batch_size=len(problems), progress=False)
    sampled = sampled_metrics(model, tokenizer, problems[:cfg["pass_questions"]], cfg, seed)
    prose_right = prose_correct(model, tokenizer, problems, min(cfg["max_new_tokens"], 170))
    row = {"accuracy": greedy["accuracy"], "no_answer": greedy["no_answer"],
           "prose_accuracy": sum(prose_right) / len(problems)}
    row |= {k: v for k, v in sampled.items() if k.startswith("pass@")}
    for name in ("chat", "prose"):
        entropy, kl = text_statistics(model, base, texts[name], tokenizer.pad_token_id, device)
        row |= {f"entropy_{name}": entropy, f"kl_{name}": kl}
    per_question = {"accuracy": [int(bool(r["correct"])) for r in rows], "prose_accuracy": prose_right}
    return row, per_question, rows[0]["completion"]


TOKEN_KINDS = ["result digits", "other digits", "answer line", "words"]


def token_kinds(text):
    """The kind of each character of a response: the digits of a computed result (after "= "),
    other digits (operands, copies), the answer line ("The answer is \\boxed{N}." and what
    follows), and everything else (words, spaces, signs)."""
    kinds = ["other digits" if c.isdigit() else "words" for c in text]
    for m in re.finditer(r"= (\d+)", text):
        kinds[m.start(1):m.end(1)] = ["result digits"] * len(m.group(1))
    answer = text.find("The answer is")
    if answer >= 0:
        kinds[answer:] = ["answer line"] * (len(text) - answer)
    return kinds


@torch.no_grad()
def mask_by_kind(model_dir, base, examples, loss_kwargs, device):
    """Which kinds of response token EKSFT's selections drop: for each kind, its share of the
    response tokens and the share of it masked by entropy (E) and by KL (K), under the policy in
    model_dir and the base as reference (eksft_loss_lean, the loop's, with return_masks=True on
    training examples)."""
    model, tokenizer = eksft.load_model_and_tokenizer(model_dir, device)
    model.eval()
    counts = {k: {"tokens": 0, "E": 0, "K": 0} for k in TOKEN_KINDS}
    for e in examples:
        batch = {k: v.to(device) for k, v in data.collate([e], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"]).logits
        base_logits = base(input_ids=batch["input_ids"]).logits
        _, st = eksft.eksft_loss_lean(logits, batch["labels"], base_logits, return_masks=True,
                                      **loss_kwargs)
        targets = batch["labels"][0, 1:]                                        # (T-1,)
        response = (targets != data.IGNORE_INDEX).nonzero().flatten().tolist()
        pieces = [tokenizer.decode([int(targets[j])]) for j in response]
        # token_kinds works on characters: a token is one character, except specials (<|im_end|>)
        offsets, position = [], 0
        for piece in pieces:
            offsets.append(position)
            position += len(piece)
        char_kinds = token_kinds("".join(pieces))
        for j, offset in zip(response, offsets):
            kind = counts[char_kinds[offset]]
            kind["tokens"] += 1
            kind["E"] += int(st["by_entropy"][0, j])
            kind["K"] += int(st["by_kl"][0, j])
    total = sum(c["tokens"] for c in counts.values())
    return {k: {"share": c["tokens"] / total, "E": c["E"] / max(c["tokens"], 1), "K": c["K"] / max(c["tokens"], 1)}
            for k, c in counts.items()}


# -----------------------------------------------------------------------------
# The pipeline for one seed: stages 1 to 4 in order


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class SeedOutcome(NamedTuple):
    """What one seed's pipeline returns (also written to OUTPUT_DIR/seedN/result.json)."""
    results: dict        # row name -> {measure: number}
    per_question: dict   # row name -> {"accuracy": [1/0 per held-out question], "prose_accuracy": [...]}
    curves: dict         # row name -> training metrics per step
    seconds: dict        # stage -> seconds
    kinds: dict          # EKSFT's masks by token kind
    selection: dict      # method name -> the selected Candidate, as a dict
    grid: dict           # method name -> every Candidate of its grid, as dicts
    pretraining: dict    # the base's record: settings, curve, seconds, reused


def run_seed(cfg, out, seed, methods, problems, val_problems, device, eksft_extra, show_mask,
             bases_from=None):
    """Stages 1-4 of one seed: its base, the tuning grid of every method, RL from each selected
    model, and the measures of all of them. The data files are in OUTPUT_DIR/seedN already."""
    seed_dir = os.path.join(out, f"seed{seed}")
    sft_data, rl_data = (os.path.join(seed_dir, f) for f in ("sft_data.jsonl", "rl_data.jsonl"))
    seconds, curves, selection, grid, argvs = {}, {}, {}, {}, {}

    def timed(stage, fn):
        start = time.perf_counter()
        value = fn()
        seconds[stage] = round(time.perf_counter() - start, 1)
        return value

    banner(f"seed {seed}: 1. pre-training its base on prose")
    base_dir, pretraining = timed("pre-train", lambda: get_base(cfg, seed, seed_dir, val_problems,
                                                                device, bases_from))
    base, tokenizer = eksft.load_model_and_tokenizer(base_dir, device)
    base.eval()
    dirs = {"base": base_dir}
    for method in methods:
        name = NAMES[method]
        best, candidates, argvs[method] = timed(f"tune {name}", lambda: tune(
            cfg, method, base_dir, sft_data, seed_dir, seed, device, val_problems,
            eksft_extra, show_mask))
        dirs[name], selection[name] = best.path, best._asdict()
        grid[name] = [c._asdict() for c in candidates]
        metrics = read_jsonl(os.path.join(os.path.dirname(best.path), "metrics.jsonl"))
        curves[name] = [r for r in metrics if r["step"] <= best.step]
    if cfg["rl_steps"] > 0:
        for method in methods:
            name = f"{NAMES[method]}+RL"
            dirs[name] = os.path.join(seed_dir, f"{method}-rl")
            argv = rl_args(cfg, dirs[NAMES[method]], rl_data, dirs[name], seed, str(device))
            banner(f"seed {seed}: {name}  (python rl.py {shlex.join(argv)})")
            _model, _tokenizer, history = timed(name, lambda: rl.train(rl.parse_args(argv)))
            curves[name] = history
    texts = held_out_texts(tokenizer, problems[:cfg["text_examples"]])
    banner(f"seed {seed}: measuring {len(dirs)} models on {len(problems)} held-out questions")
    results, per_question = {}, {}
    for name in dirs:
        results[name], per_question[name], example = timed(f"measure {name}", lambda: measure(
            dirs[name], base, cfg, problems, texts, seed, device))
        print(f"{name:9s} " + " | ".join(f"{k} {v:.3f}" for k, v in results[name].items()))
        print(f"{'':9s} held-out question 0, greedy: {example[:150]!r}")
    kinds = {}
    if "eksft" in methods:   # which tokens EKSFT drops at step 1 and in its selected model
        conversations = data.load_conversations(sft_data, seed=seed)
        examples = data.build_sft_examples(tokenizer, conversations, 512, 64, log=lambda *_: None)
        options = eksft.loss_options(eksft.parse_args(argvs["eksft"]))
        kinds["EKSFT at step 1 (policy = base)"] = mask_by_kind(base_dir, base, examples, options, device)
        kinds["EKSFT, the selected model"] = mask_by_kind(dirs["EKSFT"], base, examples, options, device)
    outcome = SeedOutcome(results, per_question, curves, seconds, kinds, selection, grid, pretraining)
    eksft.write_json(os.path.join(seed_dir, "result.json"),
                     outcome._replace(curves={}, pretraining={})._asdict())
    return outcome


def run_seed_in_worker(seed, args, cfg, out, methods, problems, val_problems):
    """run_seed in a worker process (--jobs); its output goes to OUTPUT_DIR/seedN/log.txt."""
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.join(out, f"seed{seed}"), exist_ok=True)
    with open(os.path.join(out, f"seed{seed}", "log.txt"), "w", buffering=1) as log:  # line-buffered
        sys.stdout = sys.stderr = log
        return run_seed(cfg, out, seed, methods, problems, val_problems, torch.device(args.device_name),
                        shlex.split(args.eksft_args), args.show_mask if seed == 0 else 0, args.bases)


def publish(out, text):
    """Print the report under a banner and write it to OUT/results.md (a temporary file renamed,
    so a killed run never leaves half a report)."""
    banner("results")
    print(text)
    path = os.path.join(out, "results.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def banner(text):
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


# -----------------------------------------------------------------------------
# 5. Statistics and the report


class Interval(NamedTuple):
    difference: float     # mean over seeds of (mean over questions of a - b)
    low: float            # the percentile bootstrap interval
    high: float


def paired_bootstrap(a, b, samples=10_000, level=0.95, seed=0):
    """The difference a - b of mean scores and its percentile bootstrap interval, paired.

    a, b: per seed, a list of per-question scores (1 right, 0 wrong), the same questions in the
    same order for both. One resample draws S seeds with replacement and, within each drawn seed,
    Q questions with replacement, the same draws for a and b (a question's two answers stay
    together: paired); its statistic is the mean of the drawn differences. With one seed only the
    questions vary; with few seeds the interval is rough (3 seeds give at most 10 distinct draws)."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)   # (S, Q)
    n_seeds, n_questions = d.shape
    generator = torch.Generator().manual_seed(seed)
    seeds = torch.randint(n_seeds, (samples, n_seeds), generator=generator)             # (R, S)
    questions = torch.randint(n_questions, (samples, n_seeds, n_questions), generator=generator)
    means = d[seeds.unsqueeze(-1), questions].mean(dim=(1, 2))                         # (R,)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(d.mean().item(), low, high)


def summarise(per_seed):
    """{row: {key: {"mean", "std", "values"}}} over the seeds (std: sample std, 0 for one seed)."""
    summary = {}
    for name in per_seed[0]:
        summary[name] = {}
        for key in per_seed[0][name]:
            values = [r[name][key] for r in per_seed if name in r]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            summary[name][key] = {"mean": mean, "std": std, "values": values}
    return summary


COLUMNS = [  # (key, header, how the cell is written)
    ("accuracy", "held-out acc (greedy)", "count"), ("no_answer", "no answer", "pct"),
    ("prose_accuracy", "skill in prose", "pct"),
    ("pass@1", "pass@1", "pct"), ("pass@k", "pass@k", "pct"),
    ("kl_prose", "KL to base, prose", "num"), ("kl_chat", "KL to base, chat", "num"),
    ("entropy_chat", "entropy, chat", "num"),
]


def cell(stat, how, questions):
    """mean ± std, then every seed's value: "19.3 ± 12.5 (14, 17, 43 of 128)" for a count column
    (questions right per seed), "74.2 ± 3.9 (70.3, 75.0, 77.3)" otherwise."""
    scale, digits = (1, 3) if how == "num" else (100, 1)
    values = stat["values"]
    text = f"{scale * stat['mean']:.{digits}f}" + (f" ± {scale * stat['std']:.{digits}f}" if len(values) > 1 else "")
    if how == "count":
        return text + f" ({', '.join(str(round(v * questions)) for v in values)} of {questions})"
    return text + (f" ({', '.join(f'{scale * v:.{digits}f}' for v in values)})" if len(values) > 1 else "")


def markdown_table(summary, k, questions):
    columns = [(key.replace("pass@k", f"pass@{k}"), header.replace("pass@k", f"pass@{k}"), how)
               for key, header, how in COLUMNS]
    lines = ["| model | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name in summary:
        lines.append(f"| {name} | " + " | ".join(cell(summary[name][key], how, questions)
                                                 for key, _, how in columns) + " |")
    return "\n".join(lines)


def comparison_pairs(names, with_rl):
    """Each later method against each earlier one (EKSFT - SFT, ...), the same after RL, and each
    method after RL against its own start."""
    pairs = [(a, b) for j, a in enumerate(names) for b in names[:j]]
    if with_rl:
        pairs += [(f"{a}+RL", f"{b}+RL") for a, b in pairs] + [(f"{n}+RL", n) for n in names]
    return pairs


def comparisons(per_question, pairs, questions):
    """One line per pair: for held-out accuracy and the prose skill, the difference in points, per
    seed in questions, and the 95% paired bootstrap interval; a difference is supported when its
    interval excludes 0."""
    lines = []
    for a, b in pairs:
        parts = []
        for key, header in (("accuracy", "held-out acc"), ("prose_accuracy", "skill in prose")):
            xs, ys = [s[a][key] for s in per_question], [s[b][key] for s in per_question]
            interval = paired_bootstrap(xs, ys)
            per_seed = ", ".join(f"{sum(x) - sum(y):+d}" for x, y in zip(xs, ys))
            verdict = "excludes 0" if interval.low > 0 or interval.high < 0 else "includes 0"
            parts.append(f"{header} {100 * interval.difference:+.1f} points (per seed {per_seed} of "
                         f"{questions}; 95% interval {100 * interval.low:+.1f} to {100 * interval.high:+.1f}, "
                         f"{verdict})")
        lines.append(f"- {a} minus {b}: " + "; ".join(parts))
    return "\n".join(lines)


def rl_changes(per_question, names):
    """Per seed and method: held-out questions right before and after RL, and whether RL lowered it."""
    changes = []
    for seed, rows in enumerate(per_question):
        for name in names:
            before, after = sum(rows[name]["accuracy"]), sum(rows[f"{name}+RL"]["accuracy"])
            changes.append({"seed": seed, "method": name, "before": before, "after": after,
                            "fell": after < before})
    return changes


def kinds_table(kinds):
    lines = ["| response token | share | masked by E | masked by K |", "|---|---:|---:|---:|"]
    for kind, c in kinds.items():
        lines.append(f"| {kind} | {100 * c['share']:.1f} | {100 * c['E']:.1f} | {100 * c['K']:.1f} |")
    return "\n".join(lines)


def rl_rewards(curves, names):
    """Mean training reward over the first and the last fifth of each RL run."""
    out = {}
    for name in names:
        rewards = [r["reward"] for r in curves.get(f"{name}+RL", [])]
        n = max(1, len(rewards) // 5)
        if rewards:
            out[f"{name}+RL"] = {"first": sum(rewards[:n]) / n, "last": sum(rewards[-n:]) / n}
    return out


def save_plots(summary, curves, out):
    """training_curves.png and results.png under out; returns their paths, or [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed, so no PNG files (pip install matplotlib); "
              "the table and JSON are complete without them")
        return []
    tuned = [n for n in NAMES.values() if n in curves]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [(axes[0, 0], tuned, "ce", "fine-tuning: cross-entropy on the trained tokens"),
              (axes[0, 1], tuned, "entropy", "fine-tuning: entropy per response token"),
              (axes[1, 0], ["EKSFT"], "masked_frac", "EKSFT: fraction of response tokens masked"),
              (axes[1, 1], [f"{n}+RL" for n in tuned], "reward", "GRPO: mean reward per step")]
    for ax, names, key, title in panels:
        for name in names:
            rows = [r for r in curves.get(name, []) if r.get(key) is not None]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    paths = [os.path.join(out, "training_curves.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    names = list(summary)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, key, title in zip(axes, ["accuracy", "prose_accuracy", "kl_prose", "kl_chat"],
                              ["held-out accuracy (greedy, chat prompt)", "skill in prose (greedy)",
                               "KL to base on held-out prose", "KL to base on held-out chat answers"]):
        means = [summary[n][key]["mean"] for n in names]
        spread = [summary[n][key]["std"] for n in names] if len(summary[names[0]][key]["values"]) > 1 else None
        ax.bar(names, means, yerr=spread, capsize=4,
               color=["gray" if n == "base" else f"C{list(NAMES.values()).index(n.split('+')[0])}"
                      for n in names])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    paths.append(os.path.join(out, "results.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    print("plots: " + ", ".join(paths))
    return paths


def machine(threads):
    import datasets
    import transformers
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "platform": platform.platform()}


def plan_seconds(cfg, seeds, jobs, threads, methods, cores=None):
    """The planned wall time, from COST (seconds per unit of work, one process on one core) and
    the amount of work: pre-training to the step cap (the worst case; the rule usually stops
    earlier), the grid, the validation scores, RL, the measures. The seeds run in min(jobs, seeds)
    processes; more processes x threads than cores share them. Returns {stage: seconds per seed}
    and the total wall time."""
    c, grid = COST, len(methods) * len(cfg["sft_lrs"])
    prose_tokens = min(cfg["max_new_tokens"], 170)
    evals = cfg["pretrain_max_steps"] // cfg["pretrain_eval_every"] + 2
    stage = {
        "pre-train": cfg["pretrain_max_steps"] * (1 + cfg["pretrain_cooldown"]) * c["pretrain_step"]
                     + evals * cfg["val_questions"] * prose_tokens * c["eval_token"],
        "tune": grid * (cfg["sft_epochs"] * cfg["sft_examples"] * c["sft_example"] + c["load"]
                        + cfg["sft_epochs"] * (cfg["val_questions"] * cfg["max_new_tokens"] * c["eval_token"]
                                               + c["load"])),
        "RL": len(methods) * cfg["rl_steps"] * cfg["rl_prompts"] * cfg["rl_group"] * cfg["max_new_tokens"]
              * c["rl_token"],
        "measure": (1 + 2 * len(methods)) * (c["load"] + c["eval_token"] * (
            cfg["eval_questions"] * (cfg["max_new_tokens"] + prose_tokens)
            + cfg["pass_questions"] * cfg["pass_samples"] * cfg["max_new_tokens"])),
    }
    processes = min(jobs, seeds)
    share = max(1.0, processes * threads / (cores or os.cpu_count() or 1))   # > 1: processes share cores
    return stage, sum(stage.values()) * math.ceil(seeds / processes) * share


def settings_for(args):
    cfg = dict(QUICK if args.quick else FULL, regime=args.regime)
    if args.regime == "paper" and not args.quick:
        cfg |= PAPER
    if args.sft_examples:
        cfg["sft_examples"] = args.sft_examples
    if args.rl_steps is not None:
        cfg["rl_steps"] = args.rl_steps
    if args.lrs:
        cfg["sft_lrs"] = tuple(args.lrs)
    cfg["format_docs"] = args.format_docs if args.format_docs is not None else (
        0.05 if args.regime == "paper" else 0.0)
    return cfg


def main(args):
    start = time.perf_counter()
    torch.set_num_threads(args.threads)   # the numbers must not depend on the environment's OMP setting
    cfg = settings_for(args)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    eksft.write_json(os.path.join(out, "args.json"), vars(args) | {"settings": cfg})
    device = eksft.pick_device(args.device)[0]
    args.device_name = str(device)
    methods = [m for m in offered_methods() if m in args.methods]
    names = [NAMES[m] for m in methods]
    stage_plan, planned = plan_seconds(cfg, args.seeds, args.jobs, args.threads, methods)
    print(f"tiny lab: {args.command}\nregime {args.regime}, {'--quick' if args.quick else 'full run'}, "
          f"methods {', '.join(names)}, seeds {args.seeds}, device {device}, {args.threads} torch "
          f"thread(s), output in {out}\nsettings: {cfg}\nplanned wall time: {planned / 60:.0f} min "
          f"at most on this machine's {os.cpu_count()} cores (per seed: " + ", ".join(
              f"{k} {v / 60:.1f}" for k, v in stage_plan.items()) + " min; see plan_seconds)")
    problems = held_out_problems(cfg, args.regime)
    val_problems = validation_problems(cfg, args.regime, problems)
    for seed in range(args.seeds):
        write_data(cfg, args.regime, seed, problems + val_problems, os.path.join(out, f"seed{seed}"))
    jobs = min(args.jobs, args.seeds)
    if jobs > 1:   # one process per seed, each with --threads threads: the same numbers as in sequence
        print(f"{args.seeds} seeds in {jobs} processes; each writes its output to {out}/seedN/log.txt")
        worker = functools.partial(run_seed_in_worker, args=args, cfg=cfg, out=out, methods=methods,
                                   problems=problems, val_problems=val_problems)
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            outcomes = pool.map(worker, range(args.seeds), chunksize=1)
    else:
        outcomes = [run_seed(cfg, out, seed, methods, problems, val_problems, device,
                             shlex.split(args.eksft_args), args.show_mask if seed == 0 else 0, args.bases)
                    for seed in range(args.seeds)]
    report = write_report(args, cfg, out, methods, outcomes, problems, val_problems, start, planned)
    save_plots(report["summary"], outcomes[0].curves, out)
    print(f"written: {out}/results.md, results.json, curves.json")
    return report


def write_report(args, cfg, out, methods, outcomes, problems, val_problems, start, planned):
    """results.md (printed too), results.json and curves.json."""
    names = [NAMES[m] for m in methods]
    n = len(problems)
    summary = summarise([o.results for o in outcomes])
    k = cfg["pass_samples"]
    for name in summary:  # the generic column name pass@k, whatever k is
        summary[name]["pass@k"] = summary[name][f"pass@{k}"]
    per_question = [o.per_question for o in outcomes]
    with_rl = cfg["rl_steps"] > 0
    changes = rl_changes(per_question, names) if with_rl else []
    total = round(time.perf_counter() - start, 1)
    info = machine(args.threads)
    seeds = len(outcomes)
    header = (f"`{args.command}`\n\n{info['cpu']}, {info['cores']} cores, {args.threads} torch thread(s), "
              f"jobs {min(args.jobs, seeds)}, python {info['python']}, torch {info['torch']}, transformers "
              f"{info['transformers']}, datasets {info['datasets']}, {info['platform']}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}; wall time {total / 60:.1f} min "
              f"(planned at most {planned / 60:.0f} min)")
    note = (f"{n} held-out questions; accuracy greedy, with the questions right per seed; pass@k from "
            f"{k} samples at temperature {cfg['temperature']:g} on the first {cfg['pass_questions']}; "
            f"KL and entropy in nats per token; percentages otherwise; "
            + (f"mean ± sample std over {seeds} seeds, then each seed's value" if seeds > 1 else "one seed")
            + "; each seed has its own base.")
    bases = "\n".join(
        f"- seed {s}: " + ("reused, " if o.pretraining["reused"] else "")
        + f"{o.pretraining['curve']['steps']} steps, "
        + ("converged" if o.pretraining["curve"]["converged"] else "NOT converged (step cap)")
        + "; validation prose skill by step: "
        + ", ".join(f"{e['step']}: {100 * e['prose_accuracy']:.1f}" for e in o.pretraining["curve"]["evals"])
        for s, o in enumerate(outcomes))
    selection = "\n".join(
        f"- seed {s}, {name}: lr {o.selection[name]['lr']:g}"
        + (" (an edge of the grid)" if len(cfg["sft_lrs"]) > 1 and o.selection[name]["lr"] in
           (min(cfg["sft_lrs"]), max(cfg["sft_lrs"])) else "")
        + f", step {o.selection[name]['step']}, "
        f"{o.selection[name]['val_correct']} of {len(val_problems)}; grid (lr: validation right at each "
        f"checkpoint) " + "; ".join(
            f"{lr:g}: " + ", ".join(str(c["val_correct"]) for c in o.grid[name] if c["lr"] == lr)
            for lr in cfg["sft_lrs"])
        for s, o in enumerate(outcomes) for name in names)
    fell = "\n".join(
        f"- seed {c['seed']}, {c['method']}: {c['before']} -> {c['after']} of {n}"
        + (" (fell)" if c["fell"] else " (did not fall)") for c in changes)
    rewards = {s: rl_rewards(o.curves, names) for s, o in enumerate(outcomes)}
    reward_line = "; ".join(f"seed {s}: " + ", ".join(f"{m} {r['first']:.2f} -> {r['last']:.2f}"
                                                       for m, r in rw.items()) for s, rw in rewards.items())
    times = "\n".join(f"time, seed {s}: " + " | ".join(f"{stage} {v:.0f} s" for stage, v in o.seconds.items())
                      for s, o in enumerate(outcomes))
    text = (f"{header}\n\n{markdown_table(summary, k, n)}\n\n{note}\n\n"
            f"Differences (paired over questions and seeds; 10,000 bootstrap resamples):\n\n"
            f"{comparisons(per_question, comparison_pairs(names, with_rl), n)}\n\n"
            f"Pre-training, each seed's base ({len(val_problems)} validation questions):\n\n{bases}\n\n"
            f"Selection on {len(val_problems)} validation questions (questions right; the same grid "
            f"for every method):\n\n{selection}\n\n"
            + (f"RL from each selected model, held-out questions right before -> after:\n\n{fell}\n\n"
               f"RL training reward, mean of the first and last fifth of the steps: {reward_line}\n\n"
               if with_rl else "No RL (--rl-steps 0).\n\n")
            + "".join(f"Which response tokens EKSFT drops (seed 0, its first 64 training examples, "
                      f"percent), {name}:\n\n{kinds_table(t)}\n\n" for name, t in outcomes[0].kinds.items())
            + f"{times}\n")
    publish(out, text)
    report = {"command": args.command, "args": vars(args), "settings": cfg, "machine": info,
              "methods": methods, "rows": list(summary), "summary": summary,
              "per_seed": [o.results for o in outcomes], "per_question": per_question,
              "held_out_questions": n, "validation_questions": len(val_problems), "pass_k": k,
              "selection": [o.selection for o in outcomes], "grid": [o.grid for o in outcomes],
              "pretraining": [{k: v for k, v in o.pretraining.items() if k != "curve"}
                              | {"evals": o.pretraining["curve"]["evals"],
                                 "steps": o.pretraining["curve"]["steps"],
                                 "converged": o.pretraining["curve"]["converged"]} for o in outcomes],
              "rl_changes": changes, "rl_reward": rewards,
              "mask_by_kind": [o.kinds for o in outcomes],
              "seconds": {"total": total, "planned": round(planned, 1),
                          "per_seed": [o.seconds for o in outcomes]}}
    eksft.write_json(os.path.join(out, "results.json"), report)
    eksft.write_json(os.path.join(out, "curves.json"),
                     {"pretrain": [o.pretraining["curve"]["losses"] for o in outcomes],
                      "per_seed": [o.curves for o in outcomes]})
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="SFT, DFT and EKSFT, each tuned the same way, then RL, "
                                "in miniature on a CPU.", formatter_class=data.HelpFormatter)
    p.add_argument("--output-dir", default="runs/tiny-lab", help="everything this script writes")
    p.add_argument("--quick", action="store_true", help="the same pipeline, smaller: about a minute")
    p.add_argument("--regime", default="lesson", choices=["lesson", "paper"], help="lesson: data.py's "
                   "synthetic SFT and held-out sets; paper: a wordier SFT style, harder held-out questions")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="the "
                   "eksft.py --method values to compare (one eksft.py does not offer is skipped)")
    p.add_argument("--seeds", type=int, default=1, help="run everything with seeds 0..N-1, each with "
                   "its own base; mean and spread")
    p.add_argument("--jobs", type=int, default=1, help="processes: each seed is one job (the numbers "
                   "do not change)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (recorded; the "
                   "numbers may change with it)")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="the learning-rate grid of every "
                   "method (default 5e-5 2e-4 1e-3)")
    p.add_argument("--sft-examples", type=int, default=None, help="SFT examples (default 64; 256 with "
                   "--regime paper; 32 with --quick)")
    p.add_argument("--rl-steps", type=int, default=None, help="GRPO steps from each selected model "
                   "(default 20; 2 with --quick; 0: no RL, the table has no +RL rows)")
    p.add_argument("--format-docs", type=float, default=None, metavar="F", help="fraction of pre-training "
                   "documents written as chat examples with \\boxed answers (default 0; 0.05 for --regime paper)")
    p.add_argument("--eksft-args", default="", help="extra eksft.py flags for the EKSFT runs, e.g. "
                   "\"--ratio 0.4 --combine intersection\"")
    p.add_argument("--show-mask", type=int, default=1, metavar="N", help="after EKSFT at the largest "
                   "learning rate, print N examples with the tokens it masks (eksft.py --show-mask)")
    p.add_argument("--bases", default=None, metavar="DIR", help="reuse the bases DIR/seedN/base of an "
                   "earlier run's --output-dir where their pre-training settings match this run's")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    raw = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(raw)
    args.command = "python tutorial/tiny_lab.py" + (" " + shlex.join(raw) if raw else "")
    if args.rl_steps is not None and args.rl_steps < 0:
        p.error("--rl-steps must be 0 or more")
    if args.seeds < 1 or args.jobs < 1 or args.threads < 1:
        p.error("--seeds, --jobs and --threads must be at least 1")
    if args.lrs and (len(args.lrs) < 1 or min(args.lrs) <= 0):
        p.error("--lrs must be positive learning rates")
    if args.format_docs is not None and not 0 <= args.format_docs <= 1:
        p.error("--format-docs must be between 0 and 1")
    if args.bases and not os.path.isdir(args.bases):
        p.error(f"--bases {args.bases}: no such directory")
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except data.UserError as e:
        sys.exit(f"error: {e}")
