"""
bench_update.py: the speed of RL's update (rl.rl_step), against SFT's (eksft.train_step), on CPU.

    python tests/benchmarks/bench_update.py --model /tmp/smol --threads 1    # SmolLM2-135M: ~6 min
                                                                              # of one idle core
    python tests/benchmarks/bench_update.py --model tiny --threads 1          # seconds: does it run

A script, not a test. Rollouts are built, not generated (generation is bench_rollout.py's subject):
prompts are GSM8K questions from tests/fixtures in the model's chat template with data.py's
system prompt; completion ids are GSM8K solutions in the model's tokenizer, repeated or cut to the
wanted length and ended with EOS. Every step uses AdamW as rl.py and eksft.py do; fp32, no autocast.
Times are CPU seconds of this process (time.process_time): with one thread they are the compute
time, and unlike wall seconds (shown too) they hardly change when other jobs share the cores.
Two tables:
  1. same sequences: --sequences (prompt, 60-74-token completion) pairs, as --micro-batch-size
     completions per forward for rl_step (every advantage nonzero, no KL) and as SFT examples of
     the same tokens (labels on the completion) for train_step with --method sft; the median of
     --repeats steps after an untimed one. tokens/s counts real (not padding) tokens, as the
     metrics train_tokens_per_s (rl.py) and tokens_per_s (eksft.py) do.
  2. a lesson-size step: --prompts x --group completions of --max-new-tokens at most, of them 2
     truncated at the budget and the rest 60-74 tokens; rl_step as it is ("cut": micro-batches
     sorted by length, each cut to its own longest row) and as it was before ("padded": every
     micro-batch at the width of the step's longest prompt + completion). One step each.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import eksft  # noqa: E402
import rl  # noqa: E402
from data import HelpFormatter, encode_prompt  # noqa: E402
from bench_step import machine  # noqa: E402  (this folder is on sys.path when run as a script)


def gsm8k_rows():
    with open(os.path.join(ROOT, "tests", "fixtures", "gsm8k.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def completion(tokenizer, text, length, eos_id, stop=True):
    """`length` ids of the text (repeated as needed), the last one EOS when stop (a finished
    completion); without stop, a truncated one with no EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (length // max(len(ids), 1) + 1))[:length - stop]
    return ids + [eos_id] * stop


def rollouts(tokenizer, rows, lengths, eos_id):
    """(prompts, rollouts) of rl_step's inputs: row i's question and a completion of lengths[i]
    tokens, or of -lengths[i] tokens without EOS (truncated) where it is negative."""
    row = lambda i: rows[i % len(rows)]
    prompts = [encode_prompt(tokenizer, row(i)["question"]) for i in range(len(lengths))]
    outs = [{"completion_ids": completion(tokenizer, row(i)["answer"], abs(n), eos_id, stop=n > 0),
             "truncated": n < 0} for i, n in enumerate(lengths)]
    return prompts, outs


def clocks():
    """(CPU seconds of this process, wall seconds) now, as a tensor: differences subtract."""
    return torch.tensor([time.process_time(), time.perf_counter()], dtype=torch.float64)


def median(times):
    """The step with the median CPU time: its (CPU, wall) seconds."""
    return tuple(sorted(times, key=lambda t: float(t[0]))[(len(times) - 1) // 2].tolist())


def padded_rows(self, index, device):
    """RolloutBatch.rows before the micro-batches were cut: rows only, at the step's width."""
    return rl.RolloutBatch(*(tensor[index].to(device) for tensor in self))


def time_rl(model, prompts, outs, args, repeats, pad_id, padded=False, warm_up=True):
    """(median (CPU, wall) seconds, real tokens, forward width x rows summed) of rl_step."""
    rl_args = rl.parse_args(["--model", args.model, "--micro-batch-size",
                             str(args.micro_batch_size), "--max-new-tokens",
                             str(args.max_new_tokens), "--lr", "1e-6"])
    advantages = torch.linspace(-1.0, 1.0, len(outs))
    advantages[advantages == 0] = 0.5                   # every completion gets a gradient
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    cells = []
    seen = lambda m, batch, t: (cells.append(batch.input_ids.numel()), forward(m, batch, t))[1]
    forward, rows = rl.sequence_logprobs, rl.RolloutBatch.rows
    rl.sequence_logprobs = seen
    rl.RolloutBatch.rows = padded_rows if padded else rows
    try:
        times = []
        for i in range(repeats + warm_up):               # the first one untimed
            cells.clear()
            t0 = clocks()
            sums = rl.rl_step(model, None, optimizer, prompts, outs, advantages, rl_args, pad_id,
                              torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
            times.append(clocks() - t0)
    finally:
        rl.sequence_logprobs, rl.RolloutBatch.rows = forward, rows
    return median(times[warm_up:]), sums["train_tokens"], sum(cells)


def time_sft(model, prompts, outs, args, repeats, pad_id):
    """(median (CPU, wall) seconds, real tokens) of eksft.train_step --method sft."""
    examples = [{"input_ids": p + o["completion_ids"],
                 "labels": [-100] * len(p) + o["completion_ids"]} for p, o in zip(prompts, outs)]
    loss_kwargs = eksft.loss_options(argparse.Namespace(method="sft"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    times = []
    for _ in range(repeats + 1):
        t0 = clocks()
        stats = eksft.train_step(model, None, examples, args.micro_batch_size, pad_id, loss_kwargs,
                                 torch.device("cpu"), None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(clocks() - t0)
    return median(times[1:]), stats["tokens"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="a model directory (e.g. /tmp/smol) or tiny")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward, both")
    p.add_argument("--sequences", type=int, default=16, help="table 1: sequences per step")
    p.add_argument("--repeats", type=int, default=2, help="table 1: timed steps (median)")
    p.add_argument("--prompts", type=int, default=8, help="table 2: prompts per step")
    p.add_argument("--group", type=int, default=8, help="table 2: completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="table 2: completion budget")
    p.add_argument("--skip", choices=["same", "lesson"], help="leave out one table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = eksft.load_model_and_tokenizer(args.model, torch.device("cpu"))
    model.train()
    eos_id, pad_id = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    rows = gsm8k_rows()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"# bench_update.py --model {args.model} ({n_params:.0f}M parameters, fp32): "
          f"{machine(torch.device('cpu'))}; AdamW; micro-batch {args.micro_batch_size}\n")

    if args.skip != "same":
        lengths = [60 + (7 * i) % 21 for i in range(args.sequences)]        # 60, 67, 74 tokens
        prompts, outs = rollouts(tokenizer, rows, lengths, eos_id)
        print(f"1. same sequences: {args.sequences} of prompt {min(map(len, prompts))}-"
              f"{max(map(len, prompts))} + completion {min(lengths)}-{max(lengths)} tokens; "
              f"median of {args.repeats} step(s) after one untimed\n")
        print("| update | CPU s | wall s | real tokens | tokens per CPU s | vs SFT |")
        print("|---|---:|---:|---:|---:|---:|")
        (sft_s, sft_wall), sft_tokens = time_sft(copy.deepcopy(model), prompts, outs, args,
                                                 args.repeats, pad_id)
        print(f"| SFT (eksft.train_step, --method sft) | {sft_s:.2f} | {sft_wall:.2f} | "
              f"{sft_tokens} | {sft_tokens / sft_s:.0f} | 1.00x |", flush=True)
        (rl_s, rl_wall), rl_tokens, _ = time_rl(copy.deepcopy(model), prompts, outs, args,
                                                args.repeats, pad_id)
        print(f"| GRPO (rl.rl_step) | {rl_s:.2f} | {rl_wall:.2f} | {rl_tokens} | "
              f"{rl_tokens / rl_s:.0f} | {(rl_tokens / rl_s) / (sft_tokens / sft_s):.2f}x |\n",
              flush=True)

    if args.skip != "lesson":
        n = args.prompts * args.group
        lengths = [-args.max_new_tokens if i in (5, n - 5) else 60 + (7 * i) % 21
                   for i in range(n)]                              # 2 truncated, the rest 60-74
        prompts, outs = rollouts(tokenizer, rows[:args.prompts], lengths, eos_id)
        prompts = [prompts[i // args.group * args.group] for i in range(n)]   # G copies of each
        print(f"2. a lesson-size step: {args.prompts} prompts x {args.group} completions, "
              f"2 truncated at {args.max_new_tokens} tokens, {n - 2} of 60-74; one step each "
              f"(minutes on a CPU; the untimed steps of table 1 warmed up)\n")
        print("| rl_step | CPU s | wall s | real tokens | tokens in forwards | tokens per CPU s "
              "| speed-up (CPU s) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        base = None
        for name, padded in (("padded (before)", True), ("cut (now)", False)):
            (seconds, wall), tokens, cells = time_rl(copy.deepcopy(model), prompts, outs, args, 1,
                                                     pad_id, padded=padded, warm_up=False)
            base = base or seconds
            print(f"| {name} | {seconds:.1f} | {wall:.1f} | {tokens} | {cells} | "
                  f"{tokens / seconds:.0f} | {base / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
