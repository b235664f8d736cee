"""
bench_rollout.py: RL rollout speed, rl.generate_completions' own loop next to transformers'.

    python tests/benchmarks/bench_rollout.py --model SmolLM2-135M-Instruct --threads 1 \
        --data /path/to/gsm8k/train.jsonl         # a real model, real questions: batch 32,
                                                  # 128 new tokens, greedy and sampled (~10 min
                                                  # on a loaded core; 32,64 x 256 tokens: ~45)
    python tests/benchmarks/bench_rollout.py --gpu         # GPU: Qwen2.5-0.5B's shape, random
                                                           # weights, fp32 + bf16 autocast as rl.py;
                                                           # G = 8 x 16 prompts, 1,024 new tokens
    python tests/benchmarks/bench_rollout.py --threads 1   # CPU: a ~1M and a ~5M model (~3 min)
    python tests/benchmarks/bench_rollout.py --small --threads 1  # CPU, seconds: does it run

A script, not a test (--gpu runs for minutes on one GPU). The paths:
  generate  transformers' generate with its default (dynamic) KV cache (use_generate=True): an
            ended row is padded while the batch decodes on until its longest row ends
  loop      rl.decode_batch, generate_completions' default: the same decoding, but a row that
            has ended leaves the batch and the KV cache, so the batch shrinks as rows end
  static    static_cache=True: transformers' generate with a KV cache of fixed size; on a GPU
            transformers then compiles the one-token decoding step (torch.compile, CUDA graphs).
            rl.py/evaluate.py --static-cache.
  static+compiled (--cpu-compile, CPU only): the compiled decoding step forced on a CPU through
            transformers' CompileConfig._compile_all_devices (a testing switch), to show it runs
            and gives the same completions; compiling takes minutes on a small CPU.
--model PATH (any name eksft.load_model_and_tokenizer takes) times generate and loop on a real
model: the first --batch-sizes questions of --data (GSM8K train by default: a hub download; a
local .jsonl works offline) as rl.py renders them, greedy and at temperature 1, one timed call per
row after an untimed warm-up; tokens/s = generated tokens (up to each EOS) / seconds, prefill
included. The loop gains where rows end early: SmolLM2-135M-Instruct loops to the limit in about
half of its greedy answers, and the others end first.
The random-model configurations: the same model, prompts and seed for each path; each row times
generate_completions calls after an untimed one (of the same shape for the static cache, where it
compiles on a GPU). Sampling as rl.py's defaults (temperature 1, top-p 1, seeded). A random model
rarely writes a stop token, so nearly every completion runs to the budget and the loop has little
to drop. "greedy same" counts prompts whose greedy completion (--greedy-tokens long) is identical to
generate's: it must be all of them in fp32 on a CPU (tests/test_speed_paths.py); with bf16
autocast or compiled kernels on a GPU, rounding may make a few differ, and this column says how
many. Sampled completions of the loop and generate are not compared: they are the same draws only
until a row of the batch ends (rl.generate_completions).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from eksft import char_tokenizer, load_model_and_tokenizer  # noqa: E402
from rl import generate_completions  # noqa: E402
from data import SYSTEM_PROMPT, HelpFormatter, encode_prompt, load_qa  # noqa: E402
from bench_step import machine  # noqa: E402  (this folder is on sys.path when run as a script)

QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=32768)
SMALL = lambda hidden, layers: dict(vocab_size=259, hidden_size=hidden, intermediate_size=3 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {  # models, prompts x group size, new tokens, prompt lengths, greedy check length
    "gpu": dict(models={"Qwen2.5-0.5B-shaped": QWEN_05B}, prompts=16, group=8, new_tokens=1024,
                prompt_len=(100, 250), greedy_tokens=256, repeats=1, autocast=torch.bfloat16),
    "cpu": dict(models={"tiny (eksft.py)": SMALL(128, 4), "~5M": SMALL(256, 6)}, prompts=4, group=4,
                new_tokens=64, prompt_len=(20, 60), greedy_tokens=32, repeats=3, autocast=None),
    "small": dict(models={"tiny (eksft.py)": SMALL(128, 4)}, prompts=2, group=2, new_tokens=16,
                  prompt_len=(10, 30), greedy_tokens=8, repeats=1, autocast=None),
}


def build_model(model_kwargs, tokenizer, device, seed=0):
    """A random Qwen2 that stops at the chat tokenizer's end-of-turn token (fp32 weights, as rl.py)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(**model_kwargs, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def make_prompts(n, lengths, seed=0):
    """n random prompts (ids 0..255: bytes) of lengths in [lo, hi], each repeated G times later."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = lengths
    return [torch.randint(0, 256, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_path(model, tokenizer, prompts, config, device, **path):
    """(tokens/s of the timed calls, median seconds, peak GiB, greedy completions)."""
    autocast = lambda: torch.autocast(device.type, config["autocast"], enabled=config["autocast"] is not None)
    kw = dict(max_new_tokens=config["new_tokens"], temperature=1.0, top_p=1.0, seed=0, **path)
    with autocast():
        # untimed, the same shapes (a static cache compiles for them); other paths only warm up
        generate_completions(model, tokenizer, prompts, **(kw if kw["static_cache"] else
                                                           dict(kw, max_new_tokens=8)))
        times, tokens = [], 0
        for _ in range(config["repeats"]):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            out = generate_completions(model, tokenizer, prompts, **kw)
            sync(device)
            times.append(time.perf_counter() - t0)
            tokens = sum(len(o["completion_ids"]) for o in out)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")  # GiB
        unique = list(dict.fromkeys(map(tuple, prompts)))             # each prompt once
        greedy = generate_completions(model, tokenizer, [list(p) for p in unique],
                                      max_new_tokens=config["greedy_tokens"], **path)
    seconds = statistics.median(times)
    return tokens / seconds, seconds, tokens, peak, [g["completion_ids"] for g in greedy]


def force_compile_on_cpu(model):
    """transformers compiles the decoding step only on accelerators; this testing switch of its
    CompileConfig makes it compile on a CPU too."""
    from transformers import CompileConfig
    config = CompileConfig(mode="default")
    config._compile_all_devices = True
    model.generation_config.compile_config = config


def bench_real_model(args):
    """--model: transformers' generate against generate_completions' loop on real questions, each
    decoding mode and batch size with the same prompts and seed, the two paths one after the
    other (a ratio is measured in one process, minutes apart at most)."""
    device = torch.device("cpu")
    model, tokenizer = load_model_and_tokenizer(args.model, device)
    questions = [row["question"] for row in load_qa(args.data, log=lambda line: None)]
    sizes = [int(n) for n in args.batch_sizes.split(",")]
    if len(questions) < max(sizes):
        sys.exit(f"error: --data {args.data}: {len(questions)} questions, fewer than {max(sizes)}")
    prompts = [encode_prompt(tokenizer, q, SYSTEM_PROMPT) for q in questions[:max(sizes)]]
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    paths = {"generate": dict(use_generate=True), "loop": dict(use_generate=False)}
    for kw in paths.values():   # untimed: the first calls allocate and load what they need
        generate_completions(model, tokenizer, prompts[:2], max_new_tokens=4, **kw)
    print(f"# bench_rollout.py --model {args.model}: {n_params:.1f}M parameters; "
          f"{machine(device)}")
    print(f"# prompts: the first questions of {args.data} in the chat template with rl.py's "
          f"system prompt, one per row ({min(map(len, prompts))}-{max(map(len, prompts))} tokens); "
          f"{args.new_tokens} new tokens at most; fp32; one timed call per row\n")
    print("| batch | decoding | path | seconds | generated tokens | tokens/s | vs generate | "
          "hit the limit | greedy same |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        for decoding, temperature in (("greedy", 0.0), ("temperature 1", 1.0)):
            base = None
            for path, kw in paths.items():
                t0 = time.perf_counter()
                out = generate_completions(model, tokenizer, prompts[:size],
                                           max_new_tokens=args.new_tokens, temperature=temperature,
                                           top_p=1.0, seed=0, **kw)
                seconds = time.perf_counter() - t0
                tokens = sum(len(o["completion_ids"]) for o in out)
                base = base or (tokens / seconds, out)
                same = (f"{sum(a == b for a, b in zip(out, base[1]))}/{size}" if temperature == 0
                        else "-")   # samples differ by design once a row has ended (rl.py)
                print(f"| {size} | {decoding} | {path} | {seconds:.1f} | {tokens} | "
                      f"{tokens / seconds:.1f} | {tokens / seconds / base[0]:.2f}x | "
                      f"{sum(o['truncated'] for o in out)}/{size} | {same} |", flush=True)
    print("\ntarget (issue 24): loop tokens/s >= generate's at the same batch, greedy same for all")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default=None, help="a real model (a directory, a .gguf file or a "
                   "short name: eksft.load_model_and_tokenizer): generate against the loop")
    p.add_argument("--data", default="gsm8k-train", help="with --model: the questions "
                   "(data.load_qa: an alias or a local GSM8K-style .jsonl)")
    p.add_argument("--batch-sizes", default="32", help="with --model: comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=128, help="with --model: max_new_tokens")
    p.add_argument("--gpu", action="store_true", help="the GPU configuration (needs CUDA)")
    p.add_argument("--small", action="store_true", help="a tiny CPU configuration: does it run")
    p.add_argument("--cpu-compile", action="store_true", help="CPU: add the static+compiled row")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        sys.exit("error: --gpu needs CUDA")
    if args.gpu and (args.small or args.cpu_compile):
        sys.exit("error: --small and --cpu-compile are CPU options; leave out --gpu")
    if args.model and (args.gpu or args.small or args.cpu_compile):
        sys.exit("error: --model runs on the CPU alone; leave out --gpu, --small, --cpu-compile")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        return bench_real_model(args)
    name = "gpu" if args.gpu else "small" if args.small else "cpu"
    config, device = CONFIGS[name], torch.device("cuda" if args.gpu else "cpu")
    tokenizer = char_tokenizer()
    prompts = [ids for ids in make_prompts(config["prompts"], config["prompt_len"])
               for _ in range(config["group"])]                       # G adjacent copies, as rl.py
    paths = {"generate": dict(static_cache=False, use_generate=True),
             "loop": dict(static_cache=False), "static": dict(static_cache=True)}
    if args.cpu_compile:
        paths["static+compiled"] = dict(static_cache=True)
    print(f"# bench_rollout.py, {name} configuration: {machine(device)}")
    print(f"# {config['prompts']} prompts x G = {config['group']} = {len(prompts)} sequences, "
          f"{config['new_tokens']} new tokens, sampled (temperature 1, seeded); "
          f"{'fp32 weights, bf16 autocast' if config['autocast'] else 'fp32'}; "
          f"median of {config['repeats']} timed call(s) after one untimed\n")
    print("| model | path | seconds | generated tokens | tokens/s | vs generate | greedy same "
          "| peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model_name, model_kwargs in config["models"].items():
        model = build_model(model_kwargs, tokenizer, device)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        base = None
        for path, kw in paths.items():
            if path == "static+compiled":
                force_compile_on_cpu(model)
            t0 = time.perf_counter()
            rate, seconds, tokens, peak, greedy = bench_path(model, tokenizer, prompts, config, device, **kw)
            base = base or (rate, greedy)
            same = sum(a == b for a, b in zip(greedy, base[1]))
            print(f"| {model_name}, {n_params:.1f}M | {path} | {seconds:.2f} | {tokens} | {rate:.0f} | "
                  f"{rate / base[0]:.2f}x | {same}/{len(greedy)} | "
                  f"{'-' if peak != peak else f'{peak:.2f}'} |", flush=True)
            print(f"  ({path}: {time.perf_counter() - t0:.0f} s in all, compiling included)",
                  file=sys.stderr, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if name == "gpu":
        print("\ntarget (issue 14): static >= 3.00x generate tokens/s, greedy same for all prompts")


if __name__ == "__main__":
    main()
