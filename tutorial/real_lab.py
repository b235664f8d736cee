"""
tutorial/real_lab.py: the EKSFT paper's experiment on a real pre-trained model, on a CPU.

    python tutorial/real_lab.py --quick                     # end to end, tiny sizes (CI runs it)
    python tutorial/real_lab.py --output-dir runs/real      # one seed: plans itself to <= 2.5 h
    python tutorial/real_lab.py --output-dir runs/real --seeds 3      # later: seeds 1 and 2 added
    python tutorial/real_lab.py --output-dir runs/real-gpu --device cuda --test-questions 1319

tiny_lab.py's sibling (tutorial/README.md, "The experiment on a real model", is its lesson): the
same fair comparison, with SmolLM2-135M-Instruct (134.5M parameters, ChatML) as the pre-trained
model and GSM8K as the task. The story, one banner per stage:
  0. Settings, the base (--model, saved once as a plain directory that every stage loads), the
     carved data sets, a measured SFT step and generation batch, and the plan from them (printed;
     over --budget-hours per seed the lab stops unless --force).
  1. Tune each method the same way: SFT, DFT, EKSFT and the end-of-turn ablation (eksft.py
     --method, each at every learning rate of the grid, a checkpoint after every epoch); the
     checkpoint with the most validation questions right is the method's model (ties: more
     validation answers stated, fewer steps, the smaller learning rate). Once per SFT setting.
  2. The same GRPO (rl.train) from each selected model.
  3. Measure the base and every model: greedy accuracy, the share of completions that state an
     answer (a \\boxed{}, an answer phrase or "####": no last-number fallback) and the share cut
     at the token limit, on held-out questions of the training task and on the first
     --test-questions of the real GSM8K test; KL(model || base) per token on held-out solutions.
  4. One report (results.md, results.json): counts beside every mean, paired bootstrap intervals,
     whether RL lowered accuracy, the plan beside the real time, the versions and the machine.

The task (--task gsm8k): GSM8K problems whose reference solution takes at most TASK_MAX_STEPS
calculator steps ("<<...>>" marks). A 135M model gets about 2% of all GSM8K test questions right;
the hope was room to move on the short ones (the first full run found almost none: section 5 of
tutorial/README.md). --task synthetic: data.py's arithmetic stories, where a few dozen SFT steps
moved the same model's accuracy by tens of points. Four disjoint sets, compared by question text
(carve asserts it): held-out and validation (fixed, CARVE_SEED), the SFT set and the RL questions
(drawn per seed). The GSM8K test file is used for reporting only, with either task.

The two SFT settings (--settings), the same questions and steps, only the ending differs:
  familiar  the GSM8K solution without its <<...>> marks, ending "#### N\\nThe answer is: N": the
            form the base already writes for a GSM8K question (its instruction data had it). SFT
            here can only activate what the model can do, which is the paper's premise.
  new       the same steps ending "The final answer is \\boxed{N}.", which the base never writes:
            SFT must teach a format, where imitating every token is what helps.
The paper-faithful "familiar" set would be the base's own correct samples; on a CPU that costs
thousands of generations for a few dozen right answers (2-10% of them), so it is not offered.
Every prompt (SFT data, RL, evaluation) has the Qwen-Math system prompt (data.SYSTEM_PROMPT).

Methods (--methods): sft, dft, eksft (eksft.py's defaults: ratio 0.2, union, lambdas 0.05), and
eksft-keep-eot: EKSFT that never selects the end-of-turn token <|im_end|> by entropy or KL (eksft.py
--keep-end-of-turn). That ablation is a departure from the paper, which masks whatever the top-k
picks: a model that never trains on stopping keeps the base's habit of running to the token limit
(the base does in ~45% of answers). Offered only where eksft.py has the flag (skipped, with a note).

Simplifications (a teaching-grade run, not a replication):
  1. Small: 24 SFT examples, 2 learning rates x 2 epochs, 3 GRPO steps of 3 x 4 completions,
     16 validation, 32 held-out and 32 test questions, 256 new tokens (defaults; all flags). The
     intervals are wide, and they are printed so that nobody reads more into the means.
  2. RL is not tuned, and with few right answers most GRPO groups are flat (no gradient): the
     report gives the reward and the flat groups so that "RL changed nothing" is visible.
  3. KL to the base is measured on held-out reference solutions in the familiar format (text the
     base is at home in), with eksft.token_statistics, the function EKSFT selects tokens with.
  4. Greedy decoding only (no pass@k): sampling many answers per question is what a CPU cannot pay.
  5. Resumable at stage granularity (a training run continues from its newest checkpoint): each
     stage writes its result atomically (eksft.write_json) and a rerun skips the finished ones.
     The settings of a rerun must be the same (settings.json is checked).
"""
import argparse
import datetime
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tutorial")]   # the project's modules, and tiny_lab

import torch  # noqa: E402

import data  # noqa: E402
import eksft  # noqa: E402
import evaluate  # noqa: E402
import rl  # noqa: E402
from tiny_lab import (banner, cell, machine, paired_bootstrap, publish, read_jsonl,  # noqa: E402
                      summarise)

# -----------------------------------------------------------------------------
# 0. Settings: the full run and --quick (the same stages, tiny sizes)

FULL = dict(
    # tuning: every method at every learning rate, a checkpoint per epoch, chosen on validation
    # (batches of 4: 6 steps per epoch; a CPU pays per token, so this is as cheap as batches of 8)
    sft_examples=24, sft_batch=4, sft_epochs=2, sft_lrs=(1e-5, 5e-5), val_questions=16,
    # GRPO from each selected model; lr 5e-6: at 1e-6 (rl.py's default) three steps move nothing
    rl_steps=3, rl_prompts=3, rl_group=4, rl_lr=5e-6, temperature=1.0,
    # measures: greedy, at most max_new_tokens (a short GSM8K solution is ~60-100 tokens)
    held_out_questions=32, test_questions=32, max_new_tokens=256, eval_batch=32, kl_texts=8,
    methods=("sft", "dft", "eksft", "eksft-keep-eot"), settings=("familiar", "new"),
)
QUICK = dict(FULL, sft_examples=2, sft_batch=2, sft_epochs=1, sft_lrs=(5e-5,), val_questions=2,
             rl_steps=1, rl_prompts=2, rl_group=2, held_out_questions=2, test_questions=2,
             max_new_tokens=32, eval_batch=4, kl_texts=2, methods=("sft", "eksft"))
METHODS = {  # lab name -> (eksft.py --method, extra eksft.py flags)
    "sft": ("sft", []), "dft": ("dft", []), "eksft": ("eksft", []),
    "eksft-keep-eot": ("eksft", ["--keep-end-of-turn"]),
}
NAMES = {"sft": "SFT", "dft": "DFT", "eksft": "EKSFT", "eksft-keep-eot": "EKSFT-keep-EOT"}
SETTINGS = ("familiar", "new")
TASK_MAX_STEPS = 2        # the task: GSM8K train problems with at most this many "<<...>>" steps
CARVE_SEED = 0            # the held-out and validation questions: the same for every seed
SYNTHETIC_POOL = 3000     # --task synthetic: how many of data.py's arithmetic stories to carve
TASKS = {                 # --task -> what the report calls the training task
    "gsm8k": f"GSM8K train problems with at most {TASK_MAX_STEPS} steps",
    "synthetic": "data.py's synthetic arithmetic stories (2-3 steps)",
}
MAX_LEN = 512             # longest SFT example in tokens (the task's longest is ~350)
# relative cost of one training token, from the step times measured on a 2-core CPU
# (SFT 14-22 s, DFT 15-17 s, EKSFT 19-25 s for 8 sequences): EKSFT adds the reference's forward
METHOD_COST = {"sft": 1.0, "dft": 1.05, "eksft": 1.35, "eksft-keep-eot": 1.35}


def offered_methods(wanted, log=print):
    """The methods of `wanted` that this eksft.py accepts; the others are skipped with a note."""
    offered = []
    for name in wanted:
        method, extra = METHODS[name]
        try:
            eksft.parse_args(["--method", method] + extra)   # an unknown flag is a UserError
            offered.append(name)
        except data.UserError:
            log(f"note: eksft.py has no `--method {method} {' '.join(extra)}`; the lab runs "
                f"without {NAMES[name]}")
    return offered


# -----------------------------------------------------------------------------
# Data: the task, the carved sets, the two SFT formats


def gsm8k_steps(answer):
    """A GSM8K answer's worked steps, without the calculator marks and the "#### N" line."""
    return re.sub(r"<<[^>]*>>", "", answer.rpartition("####")[0]).strip()


def familiar_solution(answer):
    """The base's own form: steps, then "#### N" and "The answer is: N" (SmolLM2's instruction
    data has it; asked a GSM8K question, the base ends this way when it ends at all)."""
    gold = data.gsm8k_gold(answer)
    return f"{gsm8k_steps(answer)}\n#### {gold}\nThe answer is: {gold}"


def new_solution(answer):
    """A form the base does not write: the same steps, the answer in \\boxed{}."""
    return f"{gsm8k_steps(answer)}\nThe final answer is \\boxed{{{data.gsm8k_gold(answer)}}}."


FORMATS = {"familiar": familiar_solution, "new": new_solution}


def task_rows(rows):
    """The training task: problems with at most TASK_MAX_STEPS steps, each question text once."""
    seen, kept = set(), []
    for row in rows:
        if row["answer"].count("<<") <= TASK_MAX_STEPS and row["question"] not in seen:
            seen.add(row["question"])
            kept.append(row)
    return kept


def carve(train_rows, cfg, seed):
    """Disjoint sets from GSM8K train's task rows: held-out and validation from one fixed shuffle
    (CARVE_SEED; the same for every seed, a --quick run's are the first of the full run's), then
    the SFT set and the RL questions from the rest, shuffled with the run's seed."""
    pool = task_rows(train_rows)
    random.Random(CARVE_SEED).shuffle(pool)
    h, v = cfg["held_out_questions"], cfg["val_questions"]
    after_held_out = max(h, FULL["held_out_questions"])
    held_out, validation = pool[:h], pool[after_held_out:after_held_out + v]
    rest = pool[after_held_out + max(v, FULL["val_questions"]):]
    random.Random(seed).shuffle(rest)
    sets = {"held_out": held_out, "validation": validation, "sft": rest[:cfg["sft_examples"]],
            "rl": rest[cfg["sft_examples"]:]}
    names = list(sets)
    for i, a in enumerate(names):      # disjoint by question text: the comparison's premise
        for b in names[i + 1:]:
            shared = {r["question"] for r in sets[a]} & {r["question"] for r in sets[b]}
            assert not shared, f"{a} and {b} share {len(shared)} questions"
    return sets


def qa(rows):
    """question/answer rows as evaluate.py and rl.py read them (the gold is the text after ####)."""
    return [{"question": r["question"], "answer": data.gsm8k_gold(r["answer"])} for r in rows]


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)


def write_data(sets, seed_dir, settings):
    """The files eksft.py and rl.py read: one SFT set per setting and the RL questions."""
    os.makedirs(seed_dir, exist_ok=True)
    paths = {"rl": os.path.join(seed_dir, "rl.jsonl")}
    write_jsonl(paths["rl"], qa(sets["rl"]))
    for setting in settings:
        paths[setting] = os.path.join(seed_dir, f"sft-{setting}.jsonl")
        write_jsonl(paths[setting], [{"problem": r["question"], "solution": FORMATS[setting](
            r["answer"])} for r in sets["sft"]])
    return paths


def synthetic_task_rows(n=SYNTHETIC_POOL):
    """--task synthetic: the arithmetic stories eksft.py trains on offline, in GSM8K's shape (the
    worked steps, then "#### N"), so that carving and both SFT formats apply unchanged. The base
    gets few of them right (1 of 64 when first tried) and 32 SFT steps took SFT to 37.5%: a task
    where a 135M model's accuracy can move on a CPU budget. Only the `new` setting is this task's
    own form (its solutions end in \\boxed{}); `familiar` is GSM8K's ending, not one the base
    writes for these stories."""
    return [{"question": p["question"],
             "answer": p["solution"].rpartition(" The answer is")[0] + f"\n#### {p['answer']}"}
            for p in data.synthetic_train(n)]


def load_gsm8k(data_dir, split):
    path = os.path.join(data_dir, "gsm8k", f"{split}.jsonl")
    if not os.path.exists(path):
        raise data.UserError(f"{path} not found; --data-dir must hold gsm8k/train.jsonl and "
                             f"gsm8k/test.jsonl (question, answer ending '#### N')")
    return read_jsonl(path)


# -----------------------------------------------------------------------------
# The base, and the measured rates the plan is made from


def get_base(model, out, device):
    """The pre-trained model as a plain directory (out/base), written once: every stage loads
    this (the GGUF file takes ~18 s to dequantize, the directory a few seconds)."""
    base_dir = os.path.join(out, "base")
    record_path = os.path.join(out, "base.json")
    if os.path.exists(record_path):
        return base_dir, eksft.read_json(record_path)
    start = time.perf_counter()
    loaded, tokenizer = eksft.load_model_and_tokenizer(model, device)
    shutil.rmtree(base_dir, ignore_errors=True)
    os.makedirs(base_dir)
    saving = time.perf_counter()
    eksft.export_model(base_dir, loaded, tokenizer, {"model": model})
    record = {"model": model, "seconds": round(time.perf_counter() - start, 1),
              "save_s": round(time.perf_counter() - saving, 1),
              "parameters": sum(p.numel() for p in loaded.parameters())}
    eksft.write_json(record_path, record)
    return base_dir, record


def decode_seconds(model, tokenizer, prompts, tokens):
    """Seconds of one greedy generate call and the decoding steps it took (the longest answer)."""
    start = time.perf_counter()
    outs = rl.generate_completions(model, tokenizer, prompts, max_new_tokens=tokens)
    return time.perf_counter() - start, max(len(o["completion_ids"]) for o in outs)


def calibrate(base_dir, sft_path, questions, cfg, device, out, log=print):
    """Measured here, now: the seconds of one SFT step of sft_batch examples (forward and
    backward, no update), of loading and saving a model, and of a greedy batch of eval_batch
    prompts (prefill, and each decoding step, from two calls of different lengths)."""
    path = os.path.join(out, "calibration.json")
    if os.path.exists(path):
        return eksft.read_json(path)
    start = time.perf_counter()
    model, tokenizer = eksft.load_model_and_tokenizer(base_dir, device)
    load_s = time.perf_counter() - start
    examples = data.build_sft_examples(tokenizer, data.load_conversations(sft_path),
                                       MAX_LEN, cfg["sft_batch"], log=lambda *_: None)
    options = eksft.loss_options(eksft.parse_args(["--method", "sft"]))
    start = time.perf_counter()     # the first step, warm-up included: the plan leans high
    eksft.train_step(model, None, examples, 4, tokenizer.pad_token_id, options, device, None)
    step_s = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    prompts = [data.encode_prompt(tokenizer, q["question"]) for q in questions[:cfg["eval_batch"]]]
    short = decode_seconds(model, tokenizer, prompts, 4)
    long = decode_seconds(model, tokenizer, prompts, 4 + min(28, cfg["max_new_tokens"]))
    per_step = max(long[0] - short[0], 1e-3) / max(long[1] - short[1], 1)
    tokens = [len(e["input_ids"]) for e in examples]
    record = {"sft_step_s": round(step_s, 2), "sft_step_tokens": sum(tokens),
              "train_token_s": step_s / sum(tokens), "example_tokens": sum(tokens) / len(tokens),
              "prompt_tokens": sum(map(len, prompts)) / len(prompts), "batch": len(prompts),
              "prefill_s": max(short[0] - short[1] * per_step, 0.0), "decode_step_s": per_step,
              "load_s": round(load_s, 2), "threads": torch.get_num_threads(), "device": str(device)}
    log(f"measured: an SFT step of {len(examples)} examples ({sum(tokens)} tokens) {step_s:.1f} s; "
        f"a greedy batch of {len(prompts)}: prefill {record['prefill_s']:.2f} s, "
        f"{per_step:.3f} s per decoding step; loading a model {load_s:.1f} s")
    eksft.write_json(path, record)
    return record


def plan_seconds(cfg, cal, save_s, methods, settings):
    """Seconds per seed for each stage, from the measured rates and the amount of work. A
    greedy batch is planned to run to the token limit (the base does in ~45% of answers, and
    a batch lasts as long as its longest answer): an upper bound for models that stop."""
    T, tok = cfg["max_new_tokens"], cal["train_token_s"]
    batches = lambda n, size: math.ceil(n / size)
    # on a CPU a decoding step costs about in proportion to the sequences in the batch
    generate = lambda n, size=cfg["eval_batch"]: batches(n, size) * min(size, n) / cal["batch"] * (
        cal["prefill_s"] + T * cal["decode_step_s"])
    steps = cfg["sft_epochs"] * (cfg["sft_examples"] // cfg["sft_batch"])
    step_s = cfg["sft_batch"] * cal["example_tokens"] * tok
    runs = len(settings) * len(cfg["sft_lrs"])
    tune = runs * sum(steps * step_s * METHOD_COST[m] + cal["load_s"] * (2 + cfg["sft_epochs"])
                      + 3 * save_s * (cfg["sft_epochs"] + 1) + cfg["sft_epochs"] * generate(
                          cfg["val_questions"]) for m in methods)
    n = cfg["rl_prompts"] * cfg["rl_group"]
    rl_s = len(settings) * len(methods) * (cfg["rl_steps"] * (
        generate(n, n) + n * (cal["prompt_tokens"] + T) * tok) + 2 * cal["load_s"]
        + 4 * save_s)
    models = 1 + 2 * len(settings) * len(methods)
    measure = models * (cal["load_s"] + generate(cfg["held_out_questions"]) + generate(
        cfg["test_questions"]) + 2 * cfg["kl_texts"] * cal["example_tokens"] * tok / 3)
    return {"tune": tune, "RL": rl_s, "measure": measure}


# -----------------------------------------------------------------------------
# 1. SFT, DFT, EKSFT (and the ablation), each tuned the same way, through eksft.py's own loop


def sft_args(cfg, base_dir, sft_data, run_dir, seed, method, lr, device):
    """eksft.py arguments for one run of the grid: a checkpoint after every epoch. Every setting
    is given, so that a change to eksft.py's defaults cannot change the lab silently."""
    per_epoch = cfg["sft_examples"] // cfg["sft_batch"]
    kind, extra = METHODS[method]
    return ["--model", base_dir, "--data", sft_data, "--num-samples", str(cfg["sft_examples"]),
            "--max-len", str(MAX_LEN), "--epochs", str(cfg["sft_epochs"]),
            "--batch-size", str(cfg["sft_batch"]),
            "--micro-batch-size", str(min(4, cfg["sft_batch"])),   # 4 x 49,152-wide logits: memory
            "--lr", f"{lr:g}", "--warmup", "0.1", "--schedule", "cosine", "--seed", str(seed),
            "--output-dir", run_dir, "--save-every", str(per_epoch), "--keep-checkpoints", "0",
            "--log-every", "1", "--device", device, "--method", kind] + extra


def answers(model, tokenizer, problems, cfg):
    """Greedy completions scored as evaluate.py scores them (stated answers only): per question,
    right (1/0), stated (1/0: rl.grade found one) and truncated (1/0: no end of turn)."""
    rows, _ = evaluate.evaluate_model(model, tokenizer, problems, batch_size=cfg["eval_batch"],
                                      max_new_tokens=cfg["max_new_tokens"], progress=False)
    return {"correct": [int(bool(r["correct"])) for r in rows],
            "stated": [int(r["stated"]) for r in rows],
            "truncated": [int(r["truncated"]) for r in rows],
            "first_completion": rows[0]["completion"]}


def split_answers(scored, n):
    """answers() of two question lists asked in one call (fewer, fuller batches), split at n."""
    first = {k: v[:n] for k, v in scored.items() if k != "first_completion"}
    second = {k: v[n:] for k, v in scored.items() if k != "first_completion"}
    return first | {"first_completion": scored["first_completion"]}, second


def done_or_run(path, fn):
    """The stage whose result is `path`: read it when it exists, else compute and write it."""
    if os.path.exists(path):
        return eksft.read_json(path) | {"reused": True}
    start = time.perf_counter()
    result = fn() | {"seconds": round(time.perf_counter() - start, 1)}
    eksft.write_json(path, result)
    return result


def train_run(cfg, base_dir, sft_data, run_dir, seed, method, lr, device):
    """One eksft.py run of the grid; a killed one continues from its newest checkpoint."""
    argv = sft_args(cfg, base_dir, sft_data, run_dir, seed, method, lr, str(device))
    resume = ["--resume"] if eksft.latest_checkpoint(run_dir) else []
    banner(f"{NAMES[method]} at lr {lr:g}  (python eksft.py {shlex.join(argv + resume)})")
    eksft.train(eksft.parse_args(argv + resume))
    return {"argv": argv, "steps": eksft.checkpoint_steps(run_dir),
            "curve": read_jsonl(os.path.join(run_dir, "metrics.jsonl"))}


def validate(path, problems, cfg, device):
    model, tokenizer = eksft.load_model_and_tokenizer(path, device)
    scored = answers(model.eval(), tokenizer, problems, cfg)
    return {"correct": sum(scored["correct"]), "stated": sum(scored["stated"]),
            "truncated": sum(scored["truncated"])}


def select(candidates):
    """The most validation questions right; ties: more answers stated (at this size many scores
    tie at 0-2 right), fewer steps, the smaller learning rate (the one that moved least)."""
    return max(candidates, key=lambda c: (c["correct"], c["stated"], -c["step"], -c["lr"]))


def tune(cfg, method, base_dir, sft_data, method_dir, seed, device, validation):
    """Every learning rate of the grid, every checkpoint scored on validation, the best kept."""
    candidates, curves = [], {}
    for lr in cfg["sft_lrs"]:
        run_dir = os.path.join(method_dir, f"lr{lr:g}")
        run = done_or_run(os.path.join(run_dir, "trained.json"), lambda: train_run(
            cfg, base_dir, sft_data, run_dir, seed, method, lr, device))
        curves[f"{lr:g}"] = run["curve"]
        for step in run["steps"]:
            path = os.path.join(run_dir, f"checkpoint-{step}")
            score = done_or_run(os.path.join(run_dir, f"validation-{step}.json"),
                                lambda: validate(path, validation, cfg, device))
            candidates.append({"lr": lr, "step": step, "path": path} | score)
            print(f"validation: {NAMES[method]} lr {lr:g} step {step}: {score['correct']} right, "
                  f"{score['stated']} stated of {len(validation)}")
    best = select(candidates)
    print(f"selected: {NAMES[method]} lr {best['lr']:g} step {best['step']}")
    return {"selected": best, "grid": candidates, "curves": curves}


def prune(tuned):
    """Free the disk (~1.6 GB per checkpoint): the grid's other checkpoints go, and so do each
    run's final copy (the same weights as its last checkpoint) and the kept one's optimizer."""
    keep = tuned["selected"]["path"]
    doomed = [os.path.join(keep, "optimizer.pt")]
    for c in tuned["grid"]:
        doomed.append(os.path.join(os.path.dirname(c["path"]), "model.safetensors"))
        if c["path"] != keep:
            shutil.rmtree(c["path"], ignore_errors=True)
    for path in doomed:
        if os.path.exists(path):
            os.remove(path)


# -----------------------------------------------------------------------------
# 2. GRPO from each selected model, through rl.py's own loop


def rl_args(cfg, model_dir, rl_data, out_dir, seed, device):
    # the reward reads answers as the measure does: builtin checker, stated answers only
    return ["--model", model_dir, "--data", rl_data, "--reward", "math", "--checker", "builtin",
            "--strict-reward", "--output-dir", out_dir, "--max-steps", str(cfg["rl_steps"]),
            "--group-size", str(cfg["rl_group"]), "--prompts-per-step", str(cfg["rl_prompts"]),
            "--max-new-tokens", str(cfg["max_new_tokens"]), "--lr", f"{cfg['rl_lr']:g}",
            "--temperature", f"{cfg['temperature']:g}", "--micro-batch-size", "4",
            "--kl-coef", "0", "--eval-size", "0", "--seed", str(seed), "--save-every", "0",
            "--keep-checkpoints", "1", "--print-every", "0", "--log-every", "1",
            "--device", device]


def grpo(cfg, model_dir, rl_data, out_dir, seed, device):
    argv = rl_args(cfg, model_dir, rl_data, out_dir, seed, str(device))
    resume = ["--resume"] if eksft.latest_checkpoint(out_dir) else []
    banner(f"GRPO from {model_dir}  (python rl.py {shlex.join(argv + resume)})")
    history = rl.train(rl.parse_args(argv + resume))[2]
    metrics = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))   # all steps, also resumed ones
    for step in eksft.checkpoint_steps(out_dir):    # the final model is in out_dir itself
        shutil.rmtree(os.path.join(out_dir, f"checkpoint-{step}"), ignore_errors=True)
    return {"argv": argv, "curve": metrics or history}


# -----------------------------------------------------------------------------
# 3. Measures: accuracy, stated answers, truncation (evaluate.py), KL to the base (eksft.py)


@torch.no_grad()
def kl_to_base(model, base, examples, pad_id, device):
    """Mean KL(model || base) and the model's entropy per trained token of `examples`:
    KL_t = sum_v p(v) (log p(v) - log q(v)), q = the base (eksft.token_statistics)."""
    sums = {"kl": 0.0, "entropy": 0.0, "tokens": 0}
    for e in examples:   # one at a time: the (T, 49152) logits of two models stay small
        batch = {k: v.to(device) for k, v in data.collate([e], pad_id).items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        entropy, kl = eksft.token_statistics(model(**inputs).logits, batch["labels"],
                                             base(**inputs).logits)          # (1, T-1) each
        sums["kl"] += kl.sum().item()
        sums["entropy"] += entropy.sum().item()
        sums["tokens"] += int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
    return sums["kl"] / sums["tokens"], sums["entropy"] / sums["tokens"]


def measure(model_dir, base, texts, held_out, test, cfg, device):
    model, tokenizer = eksft.load_model_and_tokenizer(model_dir, device)
    model.eval()
    result = dict(zip(("held_out", "test"), split_answers(
        answers(model, tokenizer, held_out + test, cfg), len(held_out))))
    result["kl"], result["entropy"] = kl_to_base(model, base, texts, tokenizer.pad_token_id,
                                                 device)
    return result


def flat(result):
    """One model's numbers for the table: means over questions."""
    row = {"kl": result["kl"], "entropy": result["entropy"]}
    for where in ("held_out", "test"):
        for key in ("correct", "stated", "truncated"):
            values = result[where][key]
            row[f"{where}_{key}"] = sum(values) / len(values)
    return row


# -----------------------------------------------------------------------------
# The pipeline for one seed


def run_seed(cfg, args, out, seed, base_dir, sets, test, methods, device):
    seed_dir = os.path.join(out, f"seed{seed}")
    paths = write_data(sets, seed_dir, cfg["settings"])
    validation, held_out = qa(sets["validation"]), qa(sets["held_out"])
    selected, dirs, records = {}, {"base": base_dir}, {}
    for setting in cfg["settings"]:
        for method in methods:
            name = f"{setting}/{NAMES[method]}"
            banner(f"seed {seed}: 1. tuning {name}")
            method_dir = os.path.join(seed_dir, setting, method)
            records[name] = done_or_run(os.path.join(method_dir, "tune.json"), lambda: tune(
                cfg, method, base_dir, paths[setting], method_dir, seed, device, validation))
            prune(records[name])
            dirs[name] = selected[name] = records[name]["selected"]["path"]
    if cfg["rl_steps"] > 0:
        for name, model_dir in selected.items():
            banner(f"seed {seed}: 2. GRPO from {name}")
            rl_dir = os.path.join(os.path.dirname(os.path.dirname(model_dir)), "rl")
            records[f"{name}+RL"] = done_or_run(os.path.join(rl_dir, "grpo.json"), lambda: grpo(
                cfg, model_dir, paths["rl"], rl_dir, seed, device))
            dirs[f"{name}+RL"] = rl_dir
    banner(f"seed {seed}: 3. measuring {len(dirs)} models on {len(held_out)} held-out and "
           f"{len(test)} GSM8K test questions (greedy, at most {cfg['max_new_tokens']} tokens)")
    base, tokenizer = eksft.load_model_and_tokenizer(base_dir, device)
    base.eval()
    texts = data.build_sft_examples(tokenizer, [(f"held-out {i}", data.row_to_messages(
        {"problem": r["question"], "solution": familiar_solution(r["answer"])}, "held-out"))
        for i, r in enumerate(sets["held_out"][:cfg["kl_texts"]])], MAX_LEN, log=lambda *_: None)
    measured = {}
    for name, model_dir in dirs.items():
        # the base is measured once for all seeds (greedy: the same answers every time)
        where = os.path.join(out if name == "base" else seed_dir, "measure",
                             name.replace("/", "-") + ".json")
        os.makedirs(os.path.dirname(where), exist_ok=True)
        start_name = name.removesuffix("+RL")
        if name.endswith("+RL") and not any(s["flat_groups"] < s["groups"]
                                            for s in records[name]["curve"] if "groups" in s):
            # every GRPO group was flat (all right or all wrong): no update, the start's weights,
            # so the start's greedy answers; measured again they would cost time, not differ
            measured[name] = measured[start_name] | {"no_update": True, "seconds": 0.0}
        else:
            measured[name] = done_or_run(where, lambda: measure(model_dir, base, texts, held_out,
                                                                test, cfg, device))
        row = flat(measured[name])
        print(f"{name:26s} " + " | ".join(f"{k} {v:.3f}" for k, v in row.items()))
        first = measured[name]["held_out"]["first_completion"]
        print(f"{'':26s} held-out question 0: {first[:120]!r}")
    return {"measured": measured, "records": records}


# -----------------------------------------------------------------------------
# 4. Statistics and the report

COLUMNS = [  # (key, header, how the cell is written; "count": right per seed of the questions)
    ("held_out_correct", "held-out acc", "count"), ("held_out_stated", "held-out stated", "pct"),
    ("held_out_truncated", "held-out cut", "pct"), ("test_correct", "GSM8K test acc", "count"),
    ("test_stated", "test stated", "pct"), ("test_truncated", "test cut", "pct"),
    ("kl", "KL to base", "num"), ("entropy", "entropy", "num"),
]


def markdown_table(summary, counts):
    lines = ["| model | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name in summary:
        lines.append(f"| {name} | " + " | ".join(
            cell(summary[name][key], how, counts.get(key, 0)) for key, _, how in COLUMNS) + " |")
    return "\n".join(lines)


def comparison_pairs(settings, names, with_rl):
    """Within each setting: each method against each earlier one, the same after RL, each tuned
    model against the base and each RL model against its own start; then new against familiar."""
    pairs = []
    for s in settings:
        tuned = [f"{s}/{n}" for n in names]
        pairs += [(a, "base") for a in tuned]
        pairs += [(a, b) for j, a in enumerate(tuned) for b in tuned[:j]]
        if with_rl:
            pairs += [(f"{a}+RL", a) for a in tuned]
            pairs += [(f"{a}+RL", f"{b}+RL") for j, a in enumerate(tuned) for b in tuned[:j]]
    if len(settings) == 2:
        pairs += [(f"{settings[1]}/{n}", f"{settings[0]}/{n}") for n in names]
    return pairs


def comparisons(per_seed, pairs):
    """Per pair and benchmark: the difference in points, per seed in questions, the 95% paired
    bootstrap interval (tiny_lab.paired_bootstrap: questions and seeds resampled)."""
    lines, records = [], []
    for a, b in pairs:
        parts = []
        for where, header in (("held_out", "held-out"), ("test", "GSM8K test")):
            xs = [s[a][where]["correct"] for s in per_seed]
            ys = [s[b][where]["correct"] for s in per_seed]
            iv = paired_bootstrap(xs, ys)
            verdict = "excludes 0" if iv.low > 0 or iv.high < 0 else "includes 0"
            per = ", ".join(f"{sum(x) - sum(y):+d}" for x, y in zip(xs, ys))
            parts.append(f"{header} {100 * iv.difference:+.1f} points (per seed {per} of "
                         f"{len(xs[0])}; 95% interval {100 * iv.low:+.1f} to {100 * iv.high:+.1f}, "
                         f"{verdict})")
            records.append({"a": a, "b": b, "where": where, **iv._asdict()})
        lines.append(f"- {a} minus {b}: " + "; ".join(parts))
    return "\n".join(lines), records


def write_report(args, cfg, out, methods, outcomes, plan, planned, counts, start):
    names = [NAMES[m] for m in methods]
    per_seed = [o["measured"] for o in outcomes]
    summary = summarise([{n: flat(r) for n, r in m.items()} for m in per_seed])
    with_rl = cfg["rl_steps"] > 0
    pairs = comparison_pairs(cfg["settings"], names, with_rl)
    diff_text, intervals = comparisons(per_seed, pairs)
    info = machine(torch.get_num_threads())
    wall = round(time.perf_counter() - start, 1)
    stage_s = {}   # compute seconds per stage, summed over this and earlier (resumed) invocations
    for o in outcomes:
        for name, r in o["records"].items():
            stage = "RL" if name.endswith("+RL") else "tune"
            stage_s[stage] = stage_s.get(stage, 0) + r["seconds"]
        for name, r in o["measured"].items():
            if name != "base" or o is outcomes[0]:
                stage_s["measure"] = stage_s.get("measure", 0) + r["seconds"]
    T = cfg["max_new_tokens"]
    fell = []
    for s, m in enumerate(per_seed):
        for name in [n for n in m if n.endswith("+RL")]:
            start_name = name.removesuffix("+RL")
            for where in ("held_out", "test"):
                before, after = sum(m[start_name][where]["correct"]), sum(m[name][where]["correct"])
                fell.append({"seed": s, "model": start_name, "where": where, "before": before,
                             "after": after, "fell": after < before,
                             "no_update": bool(m[name].get("no_update"))})
    fell_text = "\n".join(f"- seed {f['seed']}, {f['model']}, {f['where'].replace('_', '-')}: "
                          f"{f['before']} -> {f['after']} of {counts[f['where'] + '_correct']}"
                          + (" (fell)" if f["fell"] else " (did not fall)")
                          + (" (no update: every GRPO group flat)" if f["no_update"] else "")
                          for f in fell)
    selection = "\n".join(
        f"- seed {s}, {n}: lr {r['selected']['lr']:g}, step {r['selected']['step']} "
        f"({r['selected']['correct']} right, {r['selected']['stated']} stated of "
        f"{cfg['val_questions']}); grid (lr, step: right/stated) " + "; ".join(
            f"{c['lr']:g}, {c['step']}: {c['correct']}/{c['stated']}" for c in r["grid"])
        for s, o in enumerate(outcomes) for n, r in o["records"].items() if "selected" in r)
    rewards = "\n".join(
        f"- seed {s}, {n}: reward per step " + ", ".join(f"{x['reward']:.2f}" for x in r["curve"])
        + "; flat groups per step " + ", ".join(f"{x['flat_groups']}/{x['groups']}"
                                                for x in r["curve"])
        for s, o in enumerate(outcomes) for n, r in o["records"].items() if n.endswith("+RL"))
    header = (f"`{args.command}`\n\n{info['cpu']}, {info['cores']} cores, "
              f"{info['torch_threads']} torch thread(s), device {args.device_name}, python "
              f"{info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
              f"{info['platform']}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}")
    times = (f"Time per seed, planned (at most) -> real compute, summed over resumed runs: "
             + ", ".join(f"{k} {plan[k] / 60:.1f} -> {stage_s.get(k, 0) / 60 / len(outcomes):.1f}"
                         for k in plan)
             + f" min; this invocation's wall time {wall / 60:.1f} min (planned at most "
               f"{planned / 60:.0f} min for everything, the base and the calibration aside)")
    note = (f"Model {args.model}; greedy answers, at most {T} new tokens, the Qwen-Math system "
            f"prompt; {counts['held_out_correct']} held-out questions of the training task "
            f"({TASKS[cfg['task']]}, disjoint from the SFT, "
            f"validation and RL questions), the first {counts['test_correct']} of the GSM8K test "
            f"file. acc: right, with the questions right per seed; stated: an answer stated "
            f"(\\boxed, an answer phrase or ####), cut: no end of turn within {T} tokens "
            f"(percent); KL(model || base) and entropy in nats per token on "
            f"{cfg['kl_texts']} held-out solutions in the familiar format; "
            + (f"mean ± sample std over {len(outcomes)} seeds" if len(outcomes) > 1
               else "one seed")
            + ".")
    text = (f"{header}\n\n{markdown_table(summary, counts)}\n\n{note}\n\n"
            f"Differences (paired over questions and seeds; 10,000 bootstrap resamples):\n\n"
            f"{diff_text}\n\n"
            f"Selection on {cfg['val_questions']} validation questions (the same grid for "
            f"every method):\n\n{selection}\n\n"
            + (f"Did RL lower accuracy? Questions right before -> after GRPO:\n\n{fell_text}\n\n"
               f"GRPO training reward:\n\n{rewards}\n\n" if with_rl
               else "No RL (--rl-steps 0).\n\n")
            + f"{times}\n")
    publish(out, text)
    report = {"command": args.command, "args": vars(args), "settings": cfg, "machine": info,
              "methods": methods, "rows": list(summary), "summary": summary,
              "per_seed": [{n: flat(r) for n, r in m.items()} for m in per_seed],
              "per_question": [{n: {w: r[w] for w in ("held_out", "test")} for n, r in m.items()}
                               for m in per_seed],
              "questions": counts, "intervals": intervals, "rl_changes": fell,
              "selection": [{n: r["selected"] for n, r in o["records"].items() if "selected" in r}
                            for o in outcomes],
              "seconds": {"wall_this_run": wall, "planned_total": round(planned, 1),
                          "planned_per_seed": plan,
                          "real_per_seed": {k: v / len(outcomes) for k, v in stage_s.items()}}}
    eksft.write_json(os.path.join(out, "results.json"), report)
    return report


# -----------------------------------------------------------------------------
# The run


def settings_for(args):
    cfg = dict(QUICK if args.quick else FULL, task=args.task)
    for key in ("sft_examples", "rl_steps", "test_questions", "held_out_questions",
                "val_questions", "max_new_tokens"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.lrs:
        cfg["sft_lrs"] = tuple(args.lrs)
    if args.methods:
        cfg["methods"] = tuple(args.methods)
    if args.settings:
        cfg["settings"] = tuple(args.settings)
    return cfg


def check_same_settings(out, cfg, model):
    """A rerun into the same directory continues it only with the same settings."""
    path = os.path.join(out, "settings.json")
    saved = eksft.read_json(path) if os.path.exists(path) else None
    current = json.loads(json.dumps(cfg | {"model": model}))   # tuples as lists, as saved
    if saved is not None and saved != current:
        changed = [k for k in current if saved.get(k) != current[k]]
        raise data.UserError(f"{out} holds a run with other settings ({', '.join(changed)}); "
                             f"use another --output-dir or the same settings")
    eksft.write_json(path, current)


def main(args):
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = settings_for(args)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    check_same_settings(out, cfg, args.model)
    device = eksft.pick_device(args.device)[0]
    args.device_name = str(device)
    methods = offered_methods(cfg["methods"])
    banner(f"real lab: {args.command}\n0. settings, base, data, plan")
    print(f"{'--quick' if args.quick else 'full run'}, model {args.model}, settings "
          f"{', '.join(cfg['settings'])}, methods {', '.join(NAMES[m] for m in methods)}, seeds "
          f"{args.seeds}, device {device}, {torch.get_num_threads()} torch thread(s), output in "
          f"{out}\nsettings: {cfg}")
    base_dir, base_record = get_base(args.model, out, device)
    test_rows = load_gsm8k(args.data_dir, "test")
    train_rows = (synthetic_task_rows() if cfg["task"] == "synthetic"
                  else load_gsm8k(args.data_dir, "train"))
    test = qa(test_rows[:cfg["test_questions"]])
    carved = [carve(train_rows, cfg, seed) for seed in range(args.seeds)]
    print(f"data: {len(task_rows(train_rows))} task problems ({TASKS[cfg['task']]}): "
          f"{len(carved[0]['held_out'])} held-out, "
          f"{len(carved[0]['validation'])} validation, {len(carved[0]['sft'])} SFT, "
          f"{len(carved[0]['rl'])} RL questions per seed; GSM8K test: the first {len(test)} of "
          f"{len(test_rows)}")
    sft_paths = write_data(carved[0], os.path.join(out, "seed0"), cfg["settings"])
    sft_path = sft_paths[cfg["settings"][0]]
    cal = calibrate(base_dir, sft_path, qa(carved[0]["validation"] + carved[0]["held_out"]),
                    cfg, device, out)
    plan = plan_seconds(cfg, cal, base_record["save_s"], methods, cfg["settings"])
    per_seed = sum(plan.values())
    planned = per_seed * args.seeds
    print(f"plan per seed (from the measured rates; at most, every answer to the token limit): "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in plan.items())
          + f"; total {per_seed / 60:.0f} min per seed, {planned / 60:.0f} min for {args.seeds} "
            f"seed(s) (stages already done are skipped)")
    if per_seed > args.budget_hours * 3600 and not args.force:
        raise data.UserError(f"the plan, {per_seed / 3600:.1f} h per seed, is over --budget-hours "
                             f"{args.budget_hours:g}: make it smaller or add --force")
    outcomes = [run_seed(cfg, args, out, seed, base_dir, carved[seed], test, methods, device)
                for seed in range(args.seeds)]
    counts = {"held_out_correct": len(carved[0]["held_out"]), "test_correct": len(test)}
    report = write_report(args, cfg, out, methods, outcomes, plan, planned, counts, start)
    print(f"written: {out}/results.md, results.json")
    return report


def parse_args(argv=None):
    p = data.ArgumentParser(description="SFT, DFT and EKSFT on a real pre-trained model, each "
                            "tuned the same way, then GRPO, measured on GSM8K.",
                            formatter_class=data.HelpFormatter)
    add = p.add_argument
    add("--output-dir", default="runs/real", help="everything this script writes (a rerun "
        "continues the run there)")
    add("--model", default="SmolLM2-135M-Instruct", help="the pre-trained model (any eksft.py "
        "--model)")
    add("--data-dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
        help="holds gsm8k/train.jsonl and gsm8k/test.jsonl")
    add("--task", choices=list(TASKS), default="gsm8k", help="the training task: short GSM8K "
        "train problems, or data.py's synthetic arithmetic (the GSM8K test is measured either "
        "way)")
    add("--quick", action="store_true", help="the same stages, tiny sizes (CI; a few minutes)")
    add("--seeds", type=int, default=1, help="seeds 0..N-1 (a rerun with more adds seeds)")
    add("--settings", nargs="+", choices=SETTINGS, help="SFT formats (default: both)")
    add("--methods", nargs="+", choices=list(METHODS), help="default: all four; sft eksft with "
        "--quick")
    add("--lrs", type=float, nargs="+", help="the learning-rate grid (default 1e-5 5e-5)")
    add("--sft-examples", type=int, help="SFT examples (default 24)")
    add("--val-questions", type=int, help="validation questions (default 16)")
    add("--held-out-questions", type=int, help="held-out questions of the task (default 32)")
    add("--test-questions", type=int, help="the first N of the GSM8K test (default 32; 1319: all)")
    add("--max-new-tokens", type=int, help="token limit of every answer (default 256)")
    add("--rl-steps", type=int, help="GRPO steps from each selected model (default 3; 0: none)")
    add("--budget-hours", type=float, default=2.5, help="refuse a plan over this per seed")
    add("--force", action="store_true", help="run even when the plan is over --budget-hours")
    add("--threads", type=int, help="torch threads (default: torch's, OMP_NUM_THREADS)")
    add("--device", default="auto", help="auto | cpu | cuda | mps")
    raw = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(raw)
    args.command = "python tutorial/real_lab.py" + (" " + shlex.join(raw) if raw else "")
    positive = ["seeds", "sft_examples", "val_questions", "held_out_questions", "test_questions",
                "max_new_tokens", "threads"]
    data.require(p, args, [(k, getattr(args, k) is None or getattr(args, k) >= 1, "at least 1")
                           for k in positive] + [
        ("rl_steps", args.rl_steps is None or args.rl_steps >= 0, "0 or more"),
        ("lrs", not args.lrs or min(args.lrs) > 0, "positive")])
    return args


if __name__ == "__main__":
    data.run_cli(lambda: main(parse_args()))
