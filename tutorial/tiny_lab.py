"""
tutorial/tiny_lab.py: the EKSFT paper's experiment in miniature, on a laptop CPU.

    python tutorial/tiny_lab.py --quick                # the whole pipeline, small (CI runs it)
    # the three regimes (below), three seeds each, three processes
    python tutorial/tiny_lab.py --seeds 3 --jobs 3 --output-dir runs/lesson                 # 1
    python tutorial/tiny_lab.py --format-docs 0.05 --seeds 3 --jobs 3 --output-dir runs/format-docs   # 2
    python tutorial/tiny_lab.py --regime paper --seeds 3 --ablations 1 --jobs 3 --output-dir runs/paper  # 3
    python tutorial/tiny_lab.py --eksft-args "--ratio 0.4 --combine intersection"   # an exercise

The story, one stage per banner below (tutorial/README.md is the lesson that goes with it):
  1. Pre-train a small Qwen2-architecture model (character tokenizer) on arithmetic word problems
     written as plain prose (with --format-docs F, one document in 1/F is a chat example instead).
  2. Low-data SFT and EKSFT from that base: eksft.train, same examples, steps and seed; with
     --ablations also EKSFT with one selection only (E, K) and with both regularisers off.
  3. Measure each model (evaluate.evaluate_model and eksft.token_statistics): greedy held-out
     accuracy, pass@k with sampling, KL(model || base) per token on held-out text, mean entropy.
  4. GRPO from SFT and from EKSFT (rl.train), same steps and seed; measure again.
  5. One results table (markdown + JSON; mean and spread with --seeds), plots if matplotlib is there.

The regimes (--regime):
  lesson  SFT data: data.py's synthetic chat examples (2-3 steps); held-out: data.py's held-out
          questions (same generator, another seed).
  paper   the paper's setting in miniature. The base has seen the format (--format-docs defaults
          to 0.05) and answers some held-out questions; the SFT set is small and written in another,
          wordier style (each step followed by "Check: ...", then "So <name> has N <item> now."), with
          2-3 step problems whose numbers are all <= 40; the held-out problems are harder than any SFT
          example (3 steps, answer > 40: every answer larger than any number SFT shows),
          so a score there is a skill activated, not a set memorised.

Everything is imported from data.py, eksft.py, rl.py and evaluate.py: this file adds the
pre-training loop, the prose corpus, the text statistics and the table, nothing else.

Simplifications (this is a miniature, not a replication):
  1. The "pre-trained distribution" is one task in prose, not the web; the model has 0.8M
     parameters and a character vocabulary (259 tokens), not 8B parameters and 152k tokens.
  2. SFT runs as `--method eksft --ratio 0 --lambda-entropy 0 --lambda-kl 0`: the same loss as
     `--method sft` (tests/test_loss.py checks this), plus a reference forward pass so that its
     KL to the base is logged at every step, like EKSFT's.
  3. One pre-trained base is shared by all seeds (and by the regimes with the same --format-docs);
     a seed changes the SFT data sample, the data order, the RL prompts and all sampling. The
     held-out questions are the same for every seed, and none is in the pre-training corpus.
  4. RL trains on 2,000 questions of data.py's generator (2-3 steps, the pre-training
     distribution) drawn with their own seed, minus the SFT and held-out questions.
  5. Numbers are reproducible: the same command on the same machine gives the same table
     (tests/test_tutorial.py checks it). torch runs --threads threads (default 1, recorded):
     another thread count changes the order of floating-point sums, so the numbers may differ
     slightly, as they may on another CPU or torch version.
  6. The base is saved in OUTPUT_DIR/base and reused by a later run with the same pre-training
     settings (delete it, or pass --base, to choose); everything after it is always recomputed.
"""
import argparse
import datetime
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
    pretrain_problems=8000, pretrain_steps=2500, pretrain_batch=8, block_size=256, pretrain_lr=3e-3,
    sft_examples=64, sft_epochs=4, sft_batch=16, sft_lr=1e-3,
    rl_steps=20, rl_prompts=16, rl_group=8, rl_lr=2e-4, temperature=1.0,
    eval_questions=128, pass_questions=16, pass_samples=8, max_new_tokens=170, text_examples=64,
    format_docs=0.0,
)
QUICK = dict(FULL, pretrain_problems=1000, pretrain_steps=120, sft_examples=48, sft_epochs=2,
             rl_steps=2, rl_prompts=4, rl_group=4, rl_lr=5e-4, eval_questions=16, pass_questions=4,
             pass_samples=4, max_new_tokens=100, text_examples=8)
PAPER = dict(  # the paper regime's changes to FULL
    max_new_tokens=260,                # the checked style is longer: a 3-step answer is ~230 characters
    sft_examples=256, sft_lr=5e-4,     # 64 examples at 1e-3 left SFT half-way between two styles
)
HELD_OUT_SEED = 10_000      # data.load_qa("synthetic") draws the held-out questions with this seed
PRETRAIN_SEED = 123_456     # the prose corpus: a seed no other set uses
RL_SEED = 200_000           # RL questions of seed s: data.synthetic_problems(2000, seed=RL_SEED + s)
SFT_MAX_NUMBER = 40         # paper regime: every number in an SFT example is <= 40, every held-out answer > 40
MAIN_ROWS = ["base", "SFT", "EKSFT", "SFT+RL", "EKSFT+RL"]
ABLATIONS = {  # --ablations: EKSFT with one part switched off (extra eksft.py flags, after --eksft-args)
    "EKSFT, E only": ["--kl-threshold", "inf", "--lambda-kl", "0"],             # no token passes: K empty
    "EKSFT, K only": ["--entropy-threshold", "inf", "--lambda-entropy", "0"],   # E empty
    "EKSFT, lambdas 0": ["--lambda-entropy", "0", "--lambda-kl", "0"],          # selection, no regularisers
}


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
    questions (the paper regime's held-out questions are chosen outside this corpus instead)."""
    lesson_held_out = {q["question"] for q in data.load_qa("synthetic", limit=cfg["eval_questions"])}
    return [p for p in data.synthetic_problems(cfg["pretrain_problems"], seed=PRETRAIN_SEED)
            if p["question"] not in lesson_held_out]


def held_out_problems(cfg, regime):
    """The held-out problems with their worked solutions; none is in the pre-training corpus.

    lesson: the first n of data.load_qa("synthetic"). paper: the first n with 3 steps and an answer
    above SFT_MAX_NUMBER, harder than every SFT example."""
    n = cfg["eval_questions"]
    if regime == "lesson":
        problems = data.synthetic_problems(n, seed=HELD_OUT_SEED)
        assert [p["question"] for p in problems] == [q["question"] for q in data.load_qa("synthetic", limit=n)]
        return problems
    seen = {p["question"] for p in data.synthetic_problems(cfg["pretrain_problems"], seed=PRETRAIN_SEED)}
    hard = [p for p in data.synthetic_problems(40 * n, seed=HELD_OUT_SEED)
            if num_steps(p) == 3 and int(p["answer"]) > SFT_MAX_NUMBER and p["question"] not in seen]
    return hard[:n]


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


def pretrain(cfg, tokenizer, device, log=print):
    """Train a fresh tiny Qwen2 on packed prose with plain next-token cross-entropy.

    The loss is eksft_loss with ratio 0 and both lambdas 0 and labels = input_ids: that is exactly
    cross-entropy on every next token (the "response" is the whole text)."""
    model = eksft.tiny_model(tokenizer, seed=0, hidden_size=cfg["hidden_size"],
                             num_layers=cfg["num_layers"]).to(device)
    documents = pretraining_documents(cfg, tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    stream = [t for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]
              for t in ids + newline]                                   # documents joined by "\n"
    block = cfg["block_size"]
    rows = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)   # (R, block)
    log(f"pre-train: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{len(documents)} documents, {len(stream) / 1e6:.2f}M tokens in {len(rows)} rows of "
        f"{block}; {cfg['pretrain_steps']} steps of {cfg['pretrain_batch']} rows")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["pretrain_lr"], betas=(0.9, 0.95),
                                  weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    curve = []
    for step in range(cfg["pretrain_steps"]):
        lr = eksft.lr_at(step, cfg["pretrain_steps"], cfg["pretrain_lr"], 0.05)   # warmup, cosine
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = rows[torch.randint(len(rows), (cfg["pretrain_batch"],), generator=generator)].to(device)
        logits = model(input_ids=batch).logits                                 # (B, block, V)
        loss, _ = eksft.eksft_loss(logits, batch, ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, "loss": loss.item(), "lr": lr})
        if (step + 1) % max(1, cfg["pretrain_steps"] // 10) == 0:
            log(f"pre-train step {step + 1:4d} | loss {loss.item():.4f} | lr {lr:.2e}")
    return model.eval(), curve


def base_settings(cfg):
    """What the base depends on: a saved base is reused only if these match."""
    keys = ("hidden_size", "num_layers", "pretrain_problems", "pretrain_steps", "pretrain_batch",
            "block_size", "pretrain_lr", "format_docs")
    return {k: cfg[k] for k in keys} | {"pretrain_seed": PRETRAIN_SEED, "held_out": cfg["eval_questions"]}


def get_base(cfg, out, device, base_dir=None):
    """The pre-trained base as a directory (eksft.py and rl.py load models from directories)."""
    if base_dir:
        print(f"base: using {base_dir} (--base)")
        return base_dir, []
    base_dir = os.path.join(out, "base")
    settings_path = os.path.join(base_dir, "pretrain.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            if json.load(f)["settings"] == base_settings(cfg):
                print(f"base: reusing {base_dir} (same pre-training settings; delete it to pre-train again)")
                return base_dir, []
    tokenizer = eksft.char_tokenizer()
    model, curve = pretrain(cfg, tokenizer, device)
    shutil.rmtree(base_dir, ignore_errors=True)
    os.makedirs(base_dir)
    eksft.export_model(base_dir, model, tokenizer, {"stage": "pre-train"} | base_settings(cfg))
    eksft.write_json(settings_path, {"settings": base_settings(cfg), "curve": curve})
    return base_dir, curve


# -----------------------------------------------------------------------------
# 2. SFT and EKSFT from the base, through eksft.py's own loop


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


def write_data(cfg, regime, seed, held_out, seed_dir):
    """One seed's data files: the SFT set and the RL questions, in seed_dir.

    SFT, lesson: data.py's synthetic chat examples (the first sft_examples of its seed + 1 pool).
    SFT, paper: 2-3 step problems whose numbers are all <= SFT_MAX_NUMBER, in the checked style.
    RL: questions of the same generator drawn with another seed (2-3 steps, the pre-training
    distribution), none of them an SFT or a held-out question (the paper's RL data is separate too)."""
    pool = data.synthetic_problems(20 * cfg["sft_examples"], seed=seed + 1)   # data.py's SFT pool for this seed
    if regime == "lesson":
        sft_rows = [{"problem": p["question"], "solution": p["solution"]} for p in pool[:cfg["sft_examples"]]]
    else:
        easy = [p for p in pool if max(int(x) for x in re.findall(r"\d+", p["solution"])) <= SFT_MAX_NUMBER]
        sft_rows = [{"problem": p["question"], "solution": checked_solution(p)} for p in easy[:cfg["sft_examples"]]]
    excluded = {p["question"] for p in held_out} | {r["problem"] for r in sft_rows}
    rl_rows = [{"question": p["question"], "answer": p["answer"]}
               for p in data.synthetic_problems(2000, seed=RL_SEED + seed) if p["question"] not in excluded]
    os.makedirs(seed_dir, exist_ok=True)
    paths = {"sft": os.path.join(seed_dir, "sft_data.jsonl"), "rl": os.path.join(seed_dir, "rl_data.jsonl")}
    for key, rows in (("sft", sft_rows), ("rl", rl_rows)):
        with open(paths[key], "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return paths


def sft_args(cfg, base_dir, sft_data, out_dir, seed, method, device, extra=(), show_mask=0):
    """eksft.py command-line arguments for one run; SFT is EKSFT with selection and lambdas off."""
    argv = ["--model", base_dir, "--data", sft_data, "--num-samples", str(cfg["sft_examples"]),
            "--max-len", "512", "--epochs", str(cfg["sft_epochs"]), "--batch-size", str(cfg["sft_batch"]),
            "--micro-batch-size", str(cfg["sft_batch"]), "--lr", str(cfg["sft_lr"]), "--warmup", "0.1",
            "--seed", str(seed), "--output-dir", out_dir, "--save-every", "0", "--keep-checkpoints", "1",
            "--log-every", str(max(1, cfg["sft_epochs"] * cfg["sft_examples"] // cfg["sft_batch"] // 4)),
            "--device", device]
    if method == "SFT":
        return argv + ["--method", "eksft", "--ratio", "0", "--lambda-entropy", "0", "--lambda-kl", "0"]
    return argv + ["--method", "eksft", "--show-mask", str(show_mask)] + list(extra)


# -----------------------------------------------------------------------------
# 3. Measures: accuracy and pass@k (evaluate.py), entropy and KL on held-out text (eksft.py)


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


def prose_accuracy(model, tokenizer, problems, max_new_tokens):
    """The skill in the pre-training format: greedy continuation of the bare question (no chat
    template), scored by the number in its first "So <name> has <N>" sentence."""
    prompts = [tokenizer(p["question"] + " ", add_special_tokens=False)["input_ids"] for p in problems]
    outputs = rl.generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    found = [re.search(r"So \w+ has (\d+)", o["text"]) for o in outputs]
    return sum(m is not None and m.group(1) == p["answer"] for m, p in zip(found, problems)) / len(problems)


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
    """All the measures of one model, as a flat dict of numbers."""
    model, tokenizer = eksft.load_model_and_tokenizer(model_dir, device)
    model.eval()
    rows, greedy = evaluate.evaluate_model(model, tokenizer, problems, max_new_tokens=cfg["max_new_tokens"],
                                           batch_size=len(problems), progress=False)
    sampled = sampled_metrics(model, tokenizer, problems[:cfg["pass_questions"]], cfg, seed)
    row = {"accuracy": greedy["accuracy"], "no_answer": greedy["no_answer"],
           "prose_accuracy": prose_accuracy(model, tokenizer, problems, min(cfg["max_new_tokens"], 170))}
    row |= {k: v for k, v in sampled.items() if k.startswith("pass@")}
    for name in ("chat", "prose"):
        entropy, kl = text_statistics(model, base, texts[name], tokenizer.pad_token_id, device)
        row |= {f"entropy_{name}": entropy, f"kl_{name}": kl}
    return row, rows[0]["completion"]


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
    model_dir and the base as reference (eksft_loss with return_masks=True on training examples)."""
    model, tokenizer = eksft.load_model_and_tokenizer(model_dir, device)
    model.eval()
    counts = {k: {"tokens": 0, "E": 0, "K": 0} for k in TOKEN_KINDS}
    for e in examples:
        batch = {k: v.to(device) for k, v in data.collate([e], tokenizer.pad_token_id).items()}
        _, st = eksft.eksft_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"],
                                 base(input_ids=batch["input_ids"]).logits, return_masks=True, **loss_kwargs)
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
# 4. GRPO from each checkpoint, through rl.py's own loop


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
# 5. The pipeline for one seed, the table over seeds, the plots


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def slug(name):
    """A row or part name as a directory name: "EKSFT, E only" -> "eksft-e-only"."""
    return name.lower().replace(", ", "-").replace(" ", "-")


def run_part(cfg, out, base_dir, seed, part, problems, device, eksft_extra, show_mask):
    """Stages 2-4 of one seed: part "main" trains SFT and EKSFT, runs RL from both and measures the
    five models; an ABLATIONS name trains and measures that EKSFT variant only (no RL). The data
    files are in OUTPUT_DIR/seedN already. Returns (results by row name, training curves, stage
    seconds, EKSFT's masks by token kind), also written to the part's result.json."""
    base, tokenizer = eksft.load_model_and_tokenizer(base_dir, device)
    base.eval()
    texts = held_out_texts(tokenizer, problems[:cfg["text_examples"]])
    seed_dir = os.path.join(out, f"seed{seed}")
    sft_data, rl_data = (os.path.join(seed_dir, f) for f in ("sft_data.jsonl", "rl_data.jsonl"))
    results, curves, seconds = {}, {}, {}
    dirs = {"base": base_dir}

    def timed(stage, fn):
        start = time.perf_counter()
        value = fn()
        seconds[stage] = round(time.perf_counter() - start, 1)
        return value

    variants = ({"SFT": None, "EKSFT": list(eksft_extra)} if part == "main"
                else {part: list(eksft_extra) + ABLATIONS[part]})
    argvs = {}
    for method, extra in variants.items():
        dirs[method] = os.path.join(seed_dir, slug(method))
        argvs[method] = sft_args(cfg, base_dir, sft_data, dirs[method], seed, "SFT" if extra is None else "EKSFT",
                                 str(device), extra or (), show_mask if method == "EKSFT" else 0)
        banner(f"seed {seed}: {method}  (python eksft.py {shlex.join(argvs[method])})")
        timed(method, lambda: eksft.train(eksft.parse_args(argvs[method])))
        curves[method] = read_jsonl(os.path.join(dirs[method], "metrics.jsonl"))
    if part == "main" and cfg["rl_steps"] > 0:
        for method in ("SFT", "EKSFT"):
            name = f"{method}+RL"
            dirs[name] = os.path.join(seed_dir, method.lower() + "-rl")
            argv = rl_args(cfg, dirs[method], rl_data, dirs[name], seed, str(device))
            banner(f"seed {seed}: {name}  (python rl.py {shlex.join(argv)})")
            curves[name] = timed(name, lambda: rl.train(rl.parse_args(argv))[2])
    rows = [r for r in MAIN_ROWS if r in dirs] if part == "main" else [part]
    banner(f"seed {seed}: measuring {len(rows)} model(s) on {len(problems)} held-out questions")
    for name in rows:
        results[name], example = timed(f"measure {name}", lambda: measure(dirs[name], base, cfg, problems,
                                                                           texts, seed, device))
        print(f"{name:9s} " + " | ".join(f"{k} {v:.3f}" for k, v in results[name].items()))
        print(f"{'':9s} held-out question 0, greedy: {example[:150]!r}")
    # which tokens EKSFT drops at step 1 and at the end of its training, on its first 64 examples
    conversations = data.load_conversations(sft_data, seed=seed)
    examples = data.build_sft_examples(tokenizer, conversations, 512, 64, log=lambda *_: None)
    options = {name: eksft.loss_options(eksft.parse_args(argvs[name])) for name in argvs if name != "SFT"}
    kinds = {}
    if part == "main":
        kinds["EKSFT at step 1 (policy = base)"] = mask_by_kind(base_dir, base, examples, options["EKSFT"], device)
    kinds |= {f"{name} at the end": mask_by_kind(dirs[name], base, examples, options[name], device)
              for name in options}
    eksft.write_json(os.path.join(seed_dir, f"result-{slug(part)}.json"),
                     {"results": results, "seconds": seconds, "mask_by_kind": kinds})
    return results, curves, seconds, kinds


def run_part_in_worker(job):
    """run_part in a worker process (--jobs); its output goes to OUTPUT_DIR/seedN/log-PART.txt."""
    args, cfg, out, base_dir, seed, part, problems = job
    torch.set_num_threads(args.threads)
    with open(os.path.join(out, f"seed{seed}", f"log-{slug(part)}.txt"), "w", buffering=1) as log:  # line-buffered
        sys.stdout = sys.stderr = log
        return run_part(cfg, out, base_dir, seed, part, problems, torch.device(args.device_name),
                        shlex.split(args.eksft_args), args.show_mask if seed == 0 else 0)


def banner(text):
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


COLUMNS = [  # (key, header, how the cell is written)
    ("accuracy", "held-out acc (greedy)", "pct"), ("no_answer", "no answer", "pct"),
    ("prose_accuracy", "skill in prose", "pct"),
    ("pass@1", "pass@1", "pct"), ("pass@k", "pass@k", "pct"),
    ("kl_prose", "KL to base, prose", "num"), ("kl_chat", "KL to base, chat", "num"),
    ("entropy_chat", "entropy, chat", "num"),
]


def summarise(per_seed):
    """{row: {key: {"mean", "std", "values"}}} over the seeds that have the row (std: sample std,
    0 for one seed; the ablation rows may come from fewer seeds than the others)."""
    summary = {}
    for name in per_seed[0]:
        summary[name] = {}
        for key in per_seed[0][name]:
            values = [r[name][key] for r in per_seed if name in r]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            summary[name][key] = {"mean": mean, "std": std, "values": values}
    return summary


def cell(stat, how, seeds):
    scale, digits = (100, 1) if how == "pct" else (1, 3)
    text = f"{scale * stat['mean']:.{digits}f}"
    return text + (f" ± {scale * stat['std']:.{digits}f}" if len(stat["values"]) > 1 else
                   " (1 seed)" if seeds > 1 else "")


def markdown_table(summary, k, seeds):
    columns = [(key.replace("pass@k", f"pass@{k}"), header.replace("pass@k", f"pass@{k}"), how)
               for key, header, how in COLUMNS]
    lines = ["| model | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name in summary:
        lines.append(f"| {name} | " + " | ".join(cell(summary[name][key], how, seeds) for key, _, how in columns) + " |")
    return "\n".join(lines)


def comparisons(summary, k, seeds):
    """Differences of means that matter, each marked by whether it exceeds the spread: the two
    mean ± std intervals do not overlap, |mean_a - mean_b| > std_a + std_b."""
    pairs = [("EKSFT", "SFT"), ("EKSFT+RL", "SFT+RL"), ("SFT+RL", "SFT"), ("EKSFT+RL", "EKSFT")]
    lines = []
    for a, b in (pair for pair in pairs if set(pair) <= set(summary)):
        parts = []
        for key, header, how in COLUMNS[:5]:
            key, header = key.replace("pass@k", f"pass@{k}"), header.replace("pass@k", f"pass@{k}")
            x, y = summary[a][key], summary[b][key]
            diff = 100 * (x["mean"] - y["mean"])
            beyond = abs(x["mean"] - y["mean"]) > x["std"] + y["std"]
            parts.append(f"{header} {diff:+.1f}" + ("" if seeds == 1 else " (beyond the spread)" if beyond
                                                      else " (within the spread)"))
        lines.append(f"- {a} minus {b}: " + ", ".join(parts))
    return "\n".join(lines)


def kinds_table(kinds):
    lines = ["| response token | share | masked by E | masked by K |", "|---|---:|---:|---:|"]
    for kind, c in kinds.items():
        lines.append(f"| {kind} | {100 * c['share']:.1f} | {100 * c['E']:.1f} | {100 * c['K']:.1f} |")
    return "\n".join(lines)


def rl_rewards(curves):
    """Mean training reward over the first and the last fifth of each RL run."""
    out = {}
    for name in ("SFT+RL", "EKSFT+RL"):
        rewards = [r["reward"] for r in curves.get(name, [])]
        n = max(1, len(rewards) // 5)
        if rewards:
            out[name] = {"first": sum(rewards[:n]) / n, "last": sum(rewards[-n:]) / n}
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
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [(axes[0, 0], ["SFT", "EKSFT"], "kl", "SFT: KL(policy || base) per response token"),
              (axes[0, 1], ["SFT", "EKSFT"], "ce", "SFT: cross-entropy on the trained tokens"),
              (axes[1, 0], ["EKSFT"], "masked_frac", "EKSFT: fraction of response tokens masked"),
              (axes[1, 1], ["SFT+RL", "EKSFT+RL"], "reward", "GRPO: mean reward per step")]
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
               color=["gray" if n == "base" else "C0" if n.startswith("SFT") else "C1" for n in names])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    paths.append(os.path.join(out, "results.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    print("plots: " + ", ".join(paths))
    return paths


def machine(threads):
    import transformers
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def settings_for(args):
    cfg = dict(QUICK if args.quick else FULL, regime=args.regime)
    if args.regime == "paper" and not args.quick:
        cfg |= PAPER
    if args.sft_examples:
        cfg["sft_examples"] = args.sft_examples
    if args.rl_steps is not None:
        cfg["rl_steps"] = args.rl_steps
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
    print(f"tiny lab: {args.command}\nregime {args.regime}, {'--quick' if args.quick else 'full run'}, "
          f"seeds {args.seeds}, device {device}, {args.threads} torch thread(s), output in {out}\nsettings: {cfg}")
    problems = held_out_problems(cfg, args.regime)

    banner("1. pre-training the base model on prose")
    t0 = time.perf_counter()
    base_dir, pretrain_curve = get_base(cfg, out, device, args.base)
    pretrain_seconds = round(time.perf_counter() - t0, 1)

    for seed in range(args.seeds):
        write_data(cfg, args.regime, seed, problems, os.path.join(out, f"seed{seed}"))
    # the work: each seed's main part, then the ablations of the first --ablations seeds
    parts = [(seed, "main") for seed in range(args.seeds)]
    parts += [(seed, name) for seed in range(args.ablations) for name in ABLATIONS]
    jobs = min(args.jobs, len(parts))
    if jobs > 1:   # one process per part, each with --threads threads: the same numbers as in sequence
        print(f"{len(parts)} parts in {jobs} processes; each writes its output to {out}/seedN/log-PART.txt")
        work = [(args, cfg, out, base_dir, seed, part, problems) for seed, part in parts]
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            outcomes = pool.map(run_part_in_worker, work, chunksize=1)
    else:
        outcomes = [run_part(cfg, out, base_dir, seed, part, problems, device, shlex.split(args.eksft_args),
                             args.show_mask if seed == 0 else 0) for seed, part in parts]
    per_seed = [{} for _ in range(args.seeds)]
    all_curves, all_seconds, kinds = ({seed: {} for seed in range(args.seeds)} for _ in range(3))
    for (seed, _), (results, curves, seconds, part_kinds) in zip(parts, outcomes):
        per_seed[seed] |= results
        all_curves[seed] |= curves
        all_seconds[seed] |= seconds
        kinds[seed] |= part_kinds

    summary = summarise(per_seed)
    k = cfg["pass_samples"]
    for name in summary:  # the generic column name pass@k, whatever k is
        summary[name]["pass@k"] = summary[name][f"pass@{k}"]
    table = markdown_table(summary, k, args.seeds)
    total = round(time.perf_counter() - start, 1)
    rewards = {seed: rl_rewards(c) for seed, c in all_curves.items()}
    note = (f"{len(problems)} held-out questions; accuracy greedy; pass@k from {k} samples at "
            f"temperature {cfg['temperature']:g} on the first {cfg['pass_questions']}; KL and entropy in nats "
            f"per token; percentages otherwise; "
            + (f"mean ± sample std over {args.seeds} seeds" if args.seeds > 1 else "one seed")
            + (f"; the ablations on the first {args.ablations} seed(s)" if 0 < args.ablations < args.seeds else "")
            + ".")
    reward_line = "no RL (--rl-steps 0)" if cfg["rl_steps"] == 0 else (
        "RL training reward, mean of the first and last fifth of the steps: ") + "; ".join(
        f"seed {s}: " + ", ".join(f"{n} {r['first']:.2f} -> {r['last']:.2f}" for n, r in rw.items())
        for s, rw in rewards.items())
    times = "\n".join(f"time, seed {s}: " + " | ".join(f"{k} {v:.0f} s" for k, v in sec.items())
                      for s, sec in all_seconds.items())
    info = machine(args.threads)
    header = (f"`{args.command}`\n\n{info['cpu']}, {info['cores']} cores, {args.threads} torch thread(s), "
              f"{'jobs ' + str(jobs) + ', ' if jobs > 1 else ''}torch {info['torch']}, transformers "
              f"{info['transformers']}, python {info['python']}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}; total {total / 60:.1f} min "
              f"(pre-train {pretrain_seconds:.0f} s{', reused' if not pretrain_curve else ''})")
    text = (f"{header}\n\n{table}\n\n{note}\n\n{comparisons(summary, k, args.seeds)}\n\n{reward_line}\n\n"
            f"Which response tokens EKSFT drops at the end of its training (seed 0, its first 64 training "
            f"examples, percent):\n\n" + "\n\n".join(f"{name}:\n\n{kinds_table(t)}" for name, t in kinds[0].items())
            + f"\n\n{times}\n")
    banner("results")
    print(text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    report = {"command": args.command, "args": vars(args), "settings": cfg, "machine": info,
              "rows": list(summary), "summary": summary, "per_seed": per_seed, "pass_k": k,
              "mask_by_kind": kinds, "rl_reward": rewards,
              "seconds": {"total": total, "pretrain": pretrain_seconds, "per_seed": all_seconds}}
    eksft.write_json(os.path.join(out, "results.json"), report)
    eksft.write_json(os.path.join(out, "curves.json"), {"pretrain": pretrain_curve, "per_seed": all_curves})
    save_plots(summary, all_curves[0], out)
    print(f"written: {out}/results.md, results.json, curves.json")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="EKSFT vs SFT, then RL, in miniature on a CPU.",
                                formatter_class=data.HelpFormatter)
    p.add_argument("--output-dir", default="runs/tiny-lab", help="everything this script writes")
    p.add_argument("--quick", action="store_true", help="the same pipeline, smaller: under 2 minutes")
    p.add_argument("--regime", default="lesson", choices=["lesson", "paper"], help="lesson: data.py's "
                   "synthetic SFT and held-out sets; paper: a wordier SFT style, harder held-out questions")
    p.add_argument("--seeds", type=int, default=1, help="repeat stages 2-4 with seeds 0..N-1; mean and spread")
    p.add_argument("--jobs", type=int, default=1, help="processes for stages 2-4: each seed's main part "
                   "and each ablation is one job (the numbers do not change)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (recorded; the "
                   "numbers may change with it)")
    p.add_argument("--sft-examples", type=int, default=None, help="SFT examples (default 64; 256 with "
                   "--regime paper; 48 with --quick)")
    p.add_argument("--rl-steps", type=int, default=None, help="GRPO steps from SFT and from EKSFT (default 20; "
                   "2 with --quick; 0: no RL, the table has no +RL rows)")
    p.add_argument("--format-docs", type=float, default=None, metavar="F", help="fraction of pre-training "
                   "documents written as chat examples with \\boxed answers (default 0; 0.05 for --regime paper)")
    p.add_argument("--eksft-args", default="", help="extra eksft.py flags for the EKSFT run, e.g. "
                   "\"--ratio 0.4 --combine intersection\"")
    p.add_argument("--ablations", type=int, default=0, metavar="N", help="on the first N seeds, also EKSFT "
                   "with E only, K only, and lambdas 0 (stages 2-3, no RL)")
    p.add_argument("--show-mask", type=int, default=1, metavar="N", help="after EKSFT, print N examples "
                   "with the tokens it masks (eksft.py --show-mask)")
    p.add_argument("--base", default=None, help="use this pre-trained base directory (OUTPUT_DIR/base "
                   "of an earlier run) instead of pre-training")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    raw = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(raw)
    args.command = "python tutorial/tiny_lab.py" + (" " + shlex.join(raw) if raw else "")
    if args.rl_steps is not None and args.rl_steps < 0:
        p.error("--rl-steps must be 0 or more")
    if args.seeds < 1 or args.jobs < 1 or args.threads < 1 or not 0 <= args.ablations <= args.seeds:
        p.error("--seeds, --jobs and --threads must be at least 1, and --ablations between 0 and --seeds")
    if args.format_docs is not None and not 0 <= args.format_docs <= 1:
        p.error("--format-docs must be between 0 and 1")
    if args.base and not os.path.exists(os.path.join(args.base, "config.json")):
        p.error(f"--base {args.base}: no model there (config.json missing)")
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except data.UserError as e:
        sys.exit(f"error: {e}")
