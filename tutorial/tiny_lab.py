"""
tutorial/tiny_lab.py: the EKSFT paper's experiment in miniature, on a laptop CPU, in minutes.

    python tutorial/tiny_lab.py --quick                  # the whole pipeline, small: < 3 min, 2 CPU cores
    python tutorial/tiny_lab.py                          # the lesson's numbers: ~15 min, 2 CPU cores
    python tutorial/tiny_lab.py --seeds 3                # mean and spread over three seeds
    python tutorial/tiny_lab.py --eksft-args "--ratio 0.4 --combine intersection"   # an exercise

The story, one stage per banner below (tutorial/README.md is the lesson that goes with it):
  1. Pre-train a small Qwen2-architecture model (character tokenizer) on arithmetic word problems
     written as plain prose. It learns the skill (the worked steps) but never sees the chat format,
     \\boxed{} or "The answer is", so its held-out score with the chat prompt is about 0.
  2. Low-data SFT and EKSFT from that base: eksft.train, same examples, steps and seed.
  3. Measure each model (evaluate.evaluate_model and eksft.token_statistics): greedy held-out
     accuracy, pass@k with sampling, KL(model || base) per token on held-out text, mean entropy.
  4. GRPO from each (rl.train), same number of steps; measure again.
  5. One results table (markdown + JSON; mean and spread with --seeds), plots if matplotlib is there.

Everything is imported from data.py, eksft.py, rl.py and evaluate.py: this file adds the
pre-training loop, the prose corpus, the text statistics and the table, nothing else.

Simplifications (this is a miniature, not a replication):
  1. The "pre-trained distribution" is one task in prose, not the web; the model has 0.8M
     parameters and a character vocabulary (259 tokens), not 0.5B parameters and 152k tokens.
  2. SFT runs as `--method eksft --ratio 0 --lambda-entropy 0 --lambda-kl 0`: the same loss as
     `--method sft` (tests/test_loss.py checks this), plus a reference forward pass so that its
     KL to the base is logged at every step, like EKSFT's.
  3. One pre-trained base is shared by all seeds; a seed changes the SFT data sample, the data
     order, the RL prompts and all sampling. The held-out questions are the same for every seed.
  4. RL trains on data.py's synthetic training questions, which overlap the SFT questions (the
     paper's RL data is separate); the held-out questions appear in neither and are removed from
     the pre-training corpus.
  5. The base is saved in OUTPUT_DIR/base and reused by a later run with the same pre-training
     settings (delete it, or pass --base, to choose); everything after it is always recomputed.
"""
import argparse
import json
import math
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
    sft_examples=256, sft_epochs=8, sft_batch=16, sft_lr=1e-3,
    rl_steps=20, rl_prompts=16, rl_group=8, rl_lr=1e-4, temperature=1.0,
    eval_questions=128, pass_questions=24, pass_samples=8, max_new_tokens=170, text_examples=64,
    format_docs=0.0,
)
QUICK = dict(FULL, pretrain_problems=2000, pretrain_steps=250, sft_examples=64, sft_epochs=2,
             rl_steps=3, rl_prompts=4, rl_group=4, eval_questions=32, pass_questions=8, pass_samples=4,
             max_new_tokens=120, text_examples=16)
HELD_OUT_SEED = 10_000      # data.load_qa("synthetic") draws the held-out questions with this seed
PRETRAIN_SEED = 123_456     # the prose corpus: a seed no other set uses
ROWS = ["base", "SFT", "EKSFT", "SFT+RL", "EKSFT+RL"]


# -----------------------------------------------------------------------------
# 1. Pre-training: the skill in plain prose, without the answer format


def prose(problem):
    """A synthetic problem as plain text: question, worked steps, and the result in words.

    No chat template, no \\boxed{}, no "The answer is" (the answer checker would accept that):
    the base model learns to do the arithmetic but not to present an answer the checker reads."""
    name, item = re.match(r"(\w+) has \d+ (\w+)\.", problem["question"]).groups()
    steps = problem["solution"].rsplit(" The answer is", 1)[0]
    return f"{problem['question']} {steps} So {name} has {problem['answer']} {item} now."


def held_out_problems(n):
    """The first n held-out problems with their worked solutions (the questions of load_qa)."""
    problems = data.synthetic_problems(n, seed=HELD_OUT_SEED)
    assert [p["question"] for p in problems] == [q["question"] for q in data.load_qa("synthetic", limit=n)]
    return problems


def pretraining_documents(cfg, tokenizer, held_out_questions):
    """The corpus: every problem as prose, except that with format_docs = F > 0 one document in
    round(1/F) is a chat example with a \\boxed answer instead, as real base models have seen some
    instruction data (an exercise: by default the base never sees the answer format)."""
    problems = [p for p in data.synthetic_problems(cfg["pretrain_problems"], seed=PRETRAIN_SEED)
                if p["question"] not in held_out_questions]
    every = round(1 / cfg["format_docs"]) if cfg["format_docs"] else 0
    documents = []
    for i, p in enumerate(problems):
        if every and i % every == 0:
            messages = data.row_to_messages({"problem": p["question"], "solution": p["solution"]}, "pre-training")
            documents.append(data.render(tokenizer, messages).rstrip("\n"))
        else:
            documents.append(prose(p))
    return documents


def pretrain(cfg, tokenizer, device, held_out_questions, log=print):
    """Train a fresh tiny Qwen2 on packed prose with plain next-token cross-entropy.

    The loss is eksft_loss with ratio 0 and both lambdas 0 and labels = input_ids: that is exactly
    cross-entropy on every next token (the "response" is the whole text)."""
    model = eksft.tiny_model(tokenizer, seed=0, hidden_size=cfg["hidden_size"],
                             num_layers=cfg["num_layers"]).to(device)
    documents = pretraining_documents(cfg, tokenizer, held_out_questions)
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


def get_base(cfg, out, device, held_out_questions, base_dir=None):
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
    model, curve = pretrain(cfg, tokenizer, device, held_out_questions)
    shutil.rmtree(base_dir, ignore_errors=True)
    os.makedirs(base_dir)
    eksft.export_model(base_dir, model, tokenizer, {"stage": "pre-train"} | base_settings(cfg))
    eksft.write_json(settings_path, {"settings": base_settings(cfg), "curve": curve})
    return base_dir, curve


# -----------------------------------------------------------------------------
# 2. SFT and EKSFT from the base, through eksft.py's own loop


def sft_args(cfg, base_dir, out_dir, seed, method, device, extra=(), show_mask=0):
    """eksft.py command-line arguments for one run; SFT is EKSFT with selection and lambdas off."""
    argv = ["--model", base_dir, "--data", "synthetic", "--num-samples", str(cfg["sft_examples"]),
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
    example of SFT (assistant tokens scored, as in training)."""
    prose_ids = tokenizer([prose(p) for p in problems], add_special_tokens=False)["input_ids"]
    conversations = [(f"held-out {i}", data.row_to_messages(
        {"problem": p["question"], "solution": p["solution"]}, f"held-out {i}")) for i, p in enumerate(problems)]
    return {"prose": [{"input_ids": ids, "labels": ids} for ids in prose_ids],
            "chat": data.build_sft_examples(tokenizer, conversations, 512, log=lambda *_: None)}


def prose_accuracy(model, tokenizer, problems, max_new_tokens):
    """The skill in the pre-training format: greedy continuation of the bare question (no chat
    template), scored by the number in its first "So <name> has <N>" sentence."""
    prompts = [tokenizer(p["question"] + " ", add_special_tokens=False)["input_ids"] for p in problems]
    outputs = rl.generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=64)
    found = [re.search(r"So \w+ has (\d+)", o["text"]) for o in outputs]
    return sum(m is not None and m.group(1) == p["answer"] for m, p in zip(found, problems)) / len(problems)


def measure(model_dir, base, cfg, problems, texts, seed, device):
    """All the measures of one model, as a flat dict of numbers."""
    model, tokenizer = eksft.load_model_and_tokenizer(model_dir, device)
    model.eval()
    common = dict(max_new_tokens=cfg["max_new_tokens"], batch_size=64, progress=False)
    rows, greedy = evaluate.evaluate_model(model, tokenizer, problems, **common)
    _, sampled = evaluate.evaluate_model(model, tokenizer, problems[:cfg["pass_questions"]],
                                         samples=cfg["pass_samples"], temperature=cfg["temperature"], seed=seed,
                                         **common)
    row = {"accuracy": greedy["accuracy"], "no_answer": greedy["no_answer"],
           "prose_accuracy": prose_accuracy(model, tokenizer, problems, cfg["max_new_tokens"])}
    row |= {k: v for k, v in sampled.items() if k.startswith("pass@")}
    for name in ("chat", "prose"):
        entropy, kl = text_statistics(model, base, texts[name], tokenizer.pad_token_id, device)
        row |= {f"entropy_{name}": entropy, f"kl_{name}": kl}
    return row, rows[0]["completion"]


# -----------------------------------------------------------------------------
# 4. GRPO from each checkpoint, through rl.py's own loop


def rl_args(cfg, model_dir, out_dir, seed, device):
    return ["--model", model_dir, "--data", "synthetic", "--reward", "math", "--output-dir", out_dir,
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


def run_seed(cfg, out, base_dir, seed, problems, device, eksft_extra, show_mask):
    """Stages 2-4 for one seed. Returns (results by row name, training curves, stage seconds)."""
    base, tokenizer = eksft.load_model_and_tokenizer(base_dir, device)
    base.eval()
    texts = held_out_texts(tokenizer, problems[:cfg["text_examples"]])
    results, curves, seconds = {}, {}, {}
    dirs = {"base": base_dir}

    def timed(stage, fn):
        start = time.perf_counter()
        value = fn()
        seconds[stage] = round(time.perf_counter() - start, 1)
        return value

    for method in ("SFT", "EKSFT"):
        dirs[method] = os.path.join(out, f"seed{seed}", method.lower())
        argv = sft_args(cfg, base_dir, dirs[method], seed, method, str(device), eksft_extra, show_mask)
        banner(f"seed {seed}: {method}  (python eksft.py {' '.join(argv)})")
        timed(method, lambda: eksft.train(eksft.parse_args(argv)))
        curves[method] = read_jsonl(os.path.join(dirs[method], "metrics.jsonl"))
    for method in ("SFT", "EKSFT"):
        name = f"{method}+RL"
        dirs[name] = os.path.join(out, f"seed{seed}", method.lower() + "-rl")
        argv = rl_args(cfg, dirs[method], dirs[name], seed, str(device))
        banner(f"seed {seed}: {name}  (python rl.py {' '.join(argv)})")
        curves[name] = timed(name, lambda: rl.train(rl.parse_args(argv))[2])
    banner(f"seed {seed}: measuring {len(ROWS)} models on {len(problems)} held-out questions")
    for name in ROWS:
        results[name], example = timed(f"measure {name}", lambda: measure(dirs[name], base, cfg, problems,
                                                                           texts, seed, device))
        print(f"{name:9s} " + " | ".join(f"{k} {v:.3f}" for k, v in results[name].items()))
        print(f"{'':9s} held-out question 0, greedy: {example[:150]!r}")
    return results, curves, seconds


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
    """{row: {key: {"mean", "std", "values"}}} over seeds (std: sample std, 0 for one seed)."""
    summary = {}
    for name in ROWS:
        summary[name] = {}
        for key in per_seed[0][name]:
            values = [r[name][key] for r in per_seed]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            summary[name][key] = {"mean": mean, "std": std, "values": values}
    return summary


def markdown_table(summary, k, seeds):
    def cell(stat, how):
        scale, digits = (100, 1) if how == "pct" else (1, 3)
        text = f"{scale * stat['mean']:.{digits}f}"
        return text + (f" ± {scale * stat['std']:.{digits}f}" if seeds > 1 else "")
    columns = [(key.replace("pass@k", f"pass@{k}"), header.replace("pass@k", f"pass@{k}"), how)
               for key, header, how in COLUMNS]
    lines = ["| model | " + " | ".join(h for _, h, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name in ROWS:
        lines.append(f"| {name} | " + " | ".join(cell(summary[name][key], how) for key, _, how in columns) + " |")
    return "\n".join(lines)


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

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, key, title in zip(axes, ["accuracy", "prose_accuracy", "kl_prose", "kl_chat"],
                              ["held-out accuracy (greedy, chat prompt)", "skill in prose (greedy)",
                               "KL to base on held-out prose", "KL to base on held-out chat answers"]):
        means = [summary[n][key]["mean"] for n in ROWS]
        spread = [summary[n][key]["std"] for n in ROWS] if len(summary[ROWS[0]][key]["values"]) > 1 else None
        ax.bar(ROWS, means, yerr=spread, capsize=4, color=["gray", "C0", "C1", "C0", "C1"])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    paths.append(os.path.join(out, "results.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    print("plots: " + ", ".join(paths))
    return paths


def machine():
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__}


def main(args):
    start = time.perf_counter()
    cfg = dict(QUICK if args.quick else FULL)
    if args.sft_examples:
        cfg["sft_examples"] = args.sft_examples
    cfg["format_docs"] = args.format_docs
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    eksft.write_json(os.path.join(out, "args.json"), vars(args) | {"settings": cfg})
    device = eksft.pick_device(args.device)[0]
    print(f"tiny lab: {'--quick' if args.quick else 'full run'}, seeds {args.seeds}, device {device}, "
          f"output in {out}\nsettings: {cfg}")
    problems = held_out_problems(cfg["eval_questions"])

    banner("1. pre-training the base model on prose")
    t0 = time.perf_counter()
    base_dir, pretrain_curve = get_base(cfg, out, device, {p["question"] for p in problems}, args.base)
    pretrain_seconds = round(time.perf_counter() - t0, 1)

    eksft_extra = shlex.split(args.eksft_args)
    per_seed, all_curves, all_seconds = [], {}, {}
    for seed in range(args.seeds):
        results, curves, seconds = run_seed(cfg, out, base_dir, seed, problems, device, eksft_extra,
                                            args.show_mask if seed == 0 else 0)
        per_seed.append(results)
        all_curves[seed], all_seconds[seed] = curves, seconds

    summary = summarise(per_seed)
    k = cfg["pass_samples"]
    for name in ROWS:  # the generic column name pass@k, whatever k is
        summary[name]["pass@k"] = summary[name][f"pass@{k}"]
    table = markdown_table(summary, k, args.seeds)
    total = round(time.perf_counter() - start, 1)
    how = (f"`python tutorial/tiny_lab.py{' --quick' if args.quick else ''}"
           f"{f' --seeds {args.seeds}' if args.seeds > 1 else ''}"
           f"{f' --eksft-args {shlex.quote(args.eksft_args)}' if args.eksft_args else ''}`")
    note = (f"{cfg['eval_questions']} held-out questions; accuracy greedy; pass@k from {k} samples at "
            f"temperature {cfg['temperature']:g} on the first {cfg['pass_questions']}; KL and entropy in nats per token; "
            + (f"mean ± sample std over {args.seeds} seeds" if args.seeds > 1 else "one seed") + ".")
    banner("results")
    stages = " | ".join(f"{k} {v:.0f} s" for k, v in all_seconds[0].items())
    print(table + "\n" + note + f"\ntime: pre-train {pretrain_seconds:.0f} s | seed 0: {stages}"
          f"\ntotal time {total / 60:.1f} min")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"{how}, {total / 60:.1f} min on {machine()['cpu']} ({os.cpu_count()} cores)\n\n"
                f"{table}\n\n{note}\n")
    report = {"args": vars(args), "settings": cfg, "machine": machine(), "rows": ROWS, "summary": summary,
              "per_seed": per_seed, "pass_k": k, "seconds": {"total": total, "pretrain": pretrain_seconds,
                                                             "per_seed": all_seconds}}
    eksft.write_json(os.path.join(out, "results.json"), report)
    eksft.write_json(os.path.join(out, "curves.json"), {"pretrain": pretrain_curve, "per_seed": all_curves})
    save_plots(summary, all_curves[0], out)
    print(f"written: {out}/results.md, results.json, curves.json")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="EKSFT vs SFT, then RL, in miniature on a CPU.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="runs/tiny-lab", help="everything this script writes")
    p.add_argument("--quick", action="store_true", help="the same pipeline, smaller: < 3 min on 2 CPU cores")
    p.add_argument("--seeds", type=int, default=1, help="repeat stages 2-4 with seeds 0..N-1; mean and spread")
    p.add_argument("--sft-examples", type=int, default=None, help="SFT examples (default 256; 64 with --quick)")
    p.add_argument("--format-docs", type=float, default=0.0, metavar="F", help="fraction of pre-training "
                   "documents written as chat examples with \\boxed answers (0: the base never sees the format)")
    p.add_argument("--eksft-args", default="", help="extra eksft.py flags for the EKSFT run, e.g. "
                   "\"--ratio 0.4 --combine intersection\"")
    p.add_argument("--show-mask", type=int, default=1, metavar="N", help="after EKSFT, print N examples "
                   "with the tokens it masks (eksft.py --show-mask)")
    p.add_argument("--base", default=None, help="use this pre-trained base directory (OUTPUT_DIR/base "
                   "of an earlier run) instead of pre-training")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    if not 0 <= args.format_docs <= 1:
        p.error("--format-docs must be between 0 and 1")
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except data.UserError as e:
        sys.exit(f"error: {e}")
