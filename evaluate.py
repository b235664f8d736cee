"""evaluate.py: one protocol to measure a base model, an SFT/EKSFT checkpoint and an RL checkpoint.

    python evaluate.py --model tiny --benchmarks synthetic --limit 20      # offline CPU run, ~10 s
    python evaluate.py --model Qwen2.5-0.5B --benchmarks gsm8k,math500      # greedy pass@1, one GPU
    python evaluate.py --model runs/rl-x --benchmarks math500 --samples 16 --temperature 0.6
    python evaluate.py --model runs/eksft-x --benchmarks gsm8k-train --limit 500 --samples 16 \\
        --temperature 1.0                             # pass@k on RL's prompts: "better exploration"
    python evaluate.py --compare runs/eval-base runs/eval-sft runs/eval-eksft runs/eval-rl

Read it top to bottom: 1. metrics (pass@k), 2. evaluating a model (evaluate_model), then the
plumbing: 3. backends, 4. resumable files, 5. tables, 6. the command line.

Small models' scores move by 5-30 points with the prompt and the answer extraction, so a run is
measured under a named protocol (data.PROTOCOLS). --protocol qwen-math (the default) is the
Qwen2.5-Math harness whose numbers papers report: zero-shot, its system prompt (data.SYSTEM_PROMPT)
and the question rendered by the model's chat template (for Qwen2.5 exactly the harness's string,
tested), greedy, 2048 new tokens, the answer rl.extract_answer finds stated (the last \\boxed{},
"the answer is X", ...), else the last number. --protocol strict is the RL reward's own rules (no
last-number fallback, 1024 tokens). Every setting, the checker and the seed go into summary.json;
a rerun into a directory measured otherwise is refused, and --compare warns when runs differ.

Outputs, per benchmark, under --output-dir: samples.jsonl (one row per completion, appended as
soon as it is scored; a rerun skips the rows already there, so an interrupted run loses nothing)
and summary.json (recomputed from the whole samples.jsonl, so resumed runs report every sample).
Beside accuracy, every protocol reports the share of completions that state an answer (stated)
and the share right only through the last-number fallback (by_last_number; 0 under strict): a
model that states nothing still scores under qwen-math, and these columns show it. no_answer, in
summary.json, is now 1 - stated under every protocol; it used to count, under qwen-math, only the
completions without a single number (0.0 for nearly every model).
A benchmark's folder is its name: the alias, or a file's stem (gsm8k/test.jsonl: test), or where
two files share a stem, folder-stem (gsm8k-test and math500-test; benchmark_names).

Simplifications and choices:
  1. Zero-shot only; no few-shot prompts, no majority voting, no answer-format retries.
  2. One checker (rl.is_equiv: builtin, math-verify or auto): no model-based judging.
  3. Greedy results do not depend on --batch-size (prompts are left padded; tested). With the
     transformers backend, a question's samples are generated together in one call seeded from
     (--seed, question index): they do not depend on the other questions, --limit, a resume, or
     --batch-size while --samples <= --batch-size; the price is calls of --samples rows. vLLM
     seeds each sample from (--seed, question index, sample index) and batches freely.
  4. The vLLM backend (--backend vllm, or auto on a CUDA machine with vllm installed) is optional
     and not covered by the tests; transformers' generate is the tested default. vLLM runs the
     checkpoint's dtype (bf16 for Qwen), so its greedy completions can change with the batch.
  5. Benchmarks are fixed: --seed changes sampling only, never which questions are asked.
  6. fp32 weights by default, also on GPUs: in bf16 a batched greedy completion drifts from the
     unbatched one (padding changes the rounding). Nor was fp32 slower: on an H100 (transformers
     5.17) a random Qwen2.5-0.5B-shaped model took 30 ms per generate step at batch 32 in fp32,
     93 ms in bf16.
"""
import hashlib
import importlib.util
import json
import math
import os
import re
import time

import torch

import eksft   # plumbing: device, model loading, output directory, JSON files
from data import (PROTOCOLS, SYSTEM_PROMPT, ArgumentParser, DataError, HelpFormatter, UserError,
                  end_of_turn_ids, encode_prompt, load_qa, prompt_messages, render, require,
                  run_cli)
from rl import (CHECKERS, checker_description, default_checker, generate_completions, grade,
                is_equiv)


# -----------------------------------------------------------------------------
# 1. Metrics: unbiased pass@k and avg@n from per-sample rows

def pass_at_k(n, c, k):
    """Probability that at least one of k samples drawn without replacement from n, c of them
    correct, is correct: 1 - C(n-c, k) / C(n, k) (the unbiased estimator of Chen et al., 2021).

    >>> pass_at_k(4, 1, 2)   # 1 - C(3,2)/C(4,2) = 1 - 3/6
    0.5
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ks_for(n):
    """k = 1, 2, 4, ... up to n, and n itself (pass@n: did any sample solve it)."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})


def metrics_from_rows(rows):
    """Scores over questions (each question weighs the same, whatever its number of samples):
    accuracy = mean fraction correct (avg@n; greedy pass@1 when n = 1), pass@k. Shares of all
    completions: stated (it states an answer), by_last_number (right only through the last-number
    fallback: accuracy minus it is what the stated answers score), no_answer (1 - stated),
    truncated (it hit --max-new-tokens); and mean_tokens, how long they were."""
    by_question = {}
    for r in rows:
        by_question.setdefault(r["question_index"], []).append(r)
    if not by_question:
        return {"questions": 0}
    n_min = min(len(v) for v in by_question.values())
    metrics = {"questions": len(by_question), "samples": n_min}
    metrics["accuracy"] = mean(sum(r["correct"] for r in v) / len(v) for v in by_question.values())
    for k in ks_for(n_min):
        metrics[f"pass@{k}"] = mean(pass_at_k(len(v), sum(r["correct"] for r in v), k)
                                    for v in by_question.values())
    graded = [stated_and_fallback(r) for r in rows]
    metrics["stated"] = mean(stated for stated, _ in graded)
    metrics["by_last_number"] = mean(fallback for _, fallback in graded)
    metrics["no_answer"] = mean(not stated for stated, _ in graded)
    metrics["truncated"] = mean(r["truncated"] for r in rows)
    metrics["mean_tokens"] = mean(r["completion_tokens"] for r in rows)
    return metrics


def stated_and_fallback(row):
    """(stated, by_last_number) of a samples.jsonl row. A row written before they were recorded is
    graded again from its completion (rl.grade); its 'correct' stays the run's own verdict."""
    if "stated" in row:
        return row["stated"], row["by_last_number"]
    stated = grade(row["completion"], row["gold"], checker="builtin").stated
    return stated, bool(row["correct"]) and not stated


def mean(values):
    values = list(values)
    return sum(values) / len(values)


# -----------------------------------------------------------------------------
# 2. Evaluating a model: which (question, sample) jobs go into which generate call, with which
# seed; each completion scored with rl.py's checker; the protocol that makes two runs comparable

def derived_seed(*parts):
    """A 31-bit seed from e.g. (--seed, question index): the same parts always give the same seed,
    and neighbouring parts give unrelated seeds (rl.generate_completions seeds sub-batch b with
    seed + b, so seed * 1000 + q style arithmetic would make different questions share seeds)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") >> 1


def generation_calls(pending, prompt_lengths, samples, batch_size, sort_and_batch):
    """Group pending (question_index, sample_index) jobs into generate calls (lists of jobs).

    sort_and_batch (greedy, or a backend with one seed per sample): jobs sorted by prompt length,
    so a batch holds prompts of similar length (little padding), cut into --batch-size batches.
    Otherwise (sampling with one seed per call): one call per question with ALL its samples, even
    the finished ones (the caller skips those), so a question's completions are the same whether
    it is evaluated fresh, with others, or after a crash.

    >>> generation_calls([(1, 0), (0, 0), (2, 0)], [5, 9, 3], 1, 2, True)   # lengths 3, 5 | 9
    [[(2, 0), (0, 0)], [(1, 0)]]
    >>> generation_calls([(0, 1), (3, 0), (3, 1)], [5, 9, 3, 4], 2, 8, False)
    [[(0, 0), (0, 1)], [(3, 0), (3, 1)]]
    """
    if sort_and_batch:
        jobs = sorted(pending, key=lambda j: (prompt_lengths[j[0]], j))
        return [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    return [[(q, s) for s in range(samples)] for q in sorted({q for q, _ in pending})]


def score_row(question_index, sample_index, problem, out, checker, last_number=False):
    """One per-sample JSONL row, graded by rl.grade as the RL reward is (plus, with last_number,
    the harness's fallback to the last formula or number when no answer is stated); 'extracted'
    is the answer it compared, 'stated' and 'by_last_number' say how it was read (rl.Verdict)."""
    verdict = grade(out["text"], problem["answer"], checker=checker, last_number=last_number)
    return {"question_index": question_index, "sample_index": sample_index,
            "question": problem["question"], "gold": problem["answer"], "completion": out["text"],
            "extracted": verdict.answer, "correct": verdict.correct, "stated": verdict.stated,
            "by_last_number": verdict.by_last_number,
            "truncated": bool(out["truncated"]), "completion_tokens": len(out["completion_ids"])}


def evaluate_model(model, tokenizer, problems, *, samples=1, temperature=0.0, top_p=1.0,
                   max_new_tokens=1024, batch_size=32, seed=0, checker="builtin",
                   system_prompt=SYSTEM_PROMPT, last_number=False, backend="transformers",
                   static_cache=False, done=(), on_row=None, progress=True):
    """Generate `samples` completions for each problem (dict with question and answer), score them
    with rl.py's checker, and return (rows, metrics); rows sorted by (question, sample) index.

    model: a transformers causal LM, or a vllm.LLM with backend="vllm". done: rows of an earlier
    run, not generated again. on_row(row) is called as each new row is scored (the CLI appends it
    to samples.jsonl). metrics["time"] covers this call's generation only.
    """
    if samples > 1 and temperature == 0:
        raise ValueError("several samples per question need temperature > 0 (greedy repeats)")
    prompts = [encode_prompt(tokenizer, p["question"], system_prompt) for p in problems]
    rows = {(r["question_index"], r["sample_index"]): r for r in done}
    pending = [(q, s) for q in range(len(problems)) for s in range(samples) if (q, s) not in rows]
    sort_and_batch = temperature == 0 or backend == "vllm"
    lengths = [len(p) for p in prompts]
    calls = generation_calls(pending, lengths, samples, batch_size, sort_and_batch)

    from tqdm import tqdm
    bar = tqdm(total=len(pending), desc="generating", unit="sample", disable=not progress)
    seconds, tokens = 0.0, 0
    for call in calls:
        call_prompts = [prompts[q] for q, _ in call]
        start = time.perf_counter()
        if backend == "vllm":
            outs = vllm_generate(model, call_prompts, [derived_seed(seed, q, s) for q, s in call],
                                 max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, stop_ids=end_of_turn_ids(tokenizer))
        else:  # one call is one question when sampling, so its seed comes from that question
            call_seed = derived_seed(seed, call[0][0]) if temperature > 0 else None
            outs = generate_completions(
                model, tokenizer, call_prompts, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, batch_size=batch_size, seed=call_seed,
                static_cache=static_cache)
        seconds += time.perf_counter() - start
        tokens += sum(len(o["completion_ids"]) for o in outs)
        new = [(job, out) for job, out in zip(call, outs) if job not in rows]
        for (q, s), out in new:
            rows[q, s] = score_row(q, s, problems[q], out, checker, last_number)
            if on_row is not None:
                on_row(rows[q, s])
        bar.update(len(new))
        bar.set_postfix(tok_per_s=f"{tokens / max(seconds, 1e-9):.0f}")
    bar.close()
    rows = [rows[key] for key in sorted(rows)]
    metrics = metrics_from_rows(rows)
    metrics["time"] = {"new_rows": len(pending), "seconds": round(seconds, 2),
                       "generated_tokens": tokens,
                       "tokens_per_second": round(tokens / seconds, 1) if seconds else None}
    return rows, metrics


# the Qwen2.5-Math harness's qwen25-math-cot prompt (--protocol qwen-math says when a template
# renders another)
HARNESS_PROMPT = ("<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
                  "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def protocol(tokenizer, name, *, max_new_tokens, temperature, top_p, samples, checker, seed,
             dtype):
    """Everything that changes a score besides the model: two runs compare only if these agree.
    name is a key of data.PROTOCOLS (prompt and answer extraction); the rest is as run."""
    settings = PROTOCOLS[name]
    return {"name": name, "about": settings["about"], "system_prompt": settings["system_prompt"],
            "prompt": render(tokenizer, prompt_messages("{question}", settings["system_prompt"]),
                             add_generation_prompt=True),
            "shots": 0, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p if temperature > 0 else None, "samples": samples, "seed": seed,
            "extraction": settings["extraction"], "checker": checker_description(checker),
            "dtype": dtype,
            "stop_tokens": tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))}


# -----------------------------------------------------------------------------
# 3. Backends: transformers (rl.generate_completions) by default, or vLLM

def choose_backend(requested, model_name):
    """(backend, reason). auto: vLLM when it is importable and a CUDA GPU is present."""
    if requested != "auto":
        return requested, "asked for with --backend"
    if model_name == "tiny":
        return "transformers", "the tiny model lives in memory, vLLM cannot load it"
    if importlib.util.find_spec("vllm") is None:
        return "transformers", "vllm is not installed"
    if not torch.cuda.is_available():
        return "transformers", "no CUDA GPU for vLLM"
    return "vllm", "vllm is installed and a CUDA GPU is present"


def load_vllm(name, seed):
    """(vllm.LLM, tokenizer); the tokenizer builds the prompts exactly as for transformers."""
    if name == "tiny":
        raise UserError("vLLM cannot load the in-memory tiny model; use --backend transformers")
    try:
        from vllm import LLM
    except ImportError:
        raise UserError("--backend vllm needs the vllm package (pip install vllm)") from None
    from transformers import AutoTokenizer
    source = eksft.model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise eksft.ModelLoadError(f"could not load the tokenizer of '{name}' ({source}): "
                                   f"{type(e).__name__}: {str(e).strip()[:200]}") from None
    return LLM(model=source, seed=seed), tokenizer


def vllm_generate(llm, prompt_ids, seeds, *, max_new_tokens, temperature, top_p, stop_ids):
    """rl.generate_completions' output format from vLLM, one request (and one seed) per prompt.
    Sampling settings are explicit, so a checkpoint's generation_config cannot change them."""
    from vllm import SamplingParams
    params = [SamplingParams(n=1, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             max_tokens=max_new_tokens, seed=s, stop_token_ids=stop_ids,
                             repetition_penalty=1.0, skip_special_tokens=True) for s in seeds]
    requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [{"completion_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
             "truncated": o.outputs[0].finish_reason == "length"} for o in outputs]


# -----------------------------------------------------------------------------
# 4. Files: samples.jsonl (append-only, resumable) and summary.json

def read_rows(path):
    """Rows of a samples.jsonl written by an earlier run ([] if none).

    Every row ends with a newline when its write completed, so a last line without one was cut by a
    crash: it is removed from the file (otherwise the next append would glue onto it) and redone."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
        print(f"resume: removed an unfinished last line from {path}")
    rows = []
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e.msg}); "
                                f"move the file away to start over") from None
    return rows


def count_rows(path):
    """Complete rows in a samples.jsonl, read-only (a run may be writing it right now)."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(line.endswith(b"\n") and bool(line.strip()) for line in f)


def resumable_rows(rows, problems, path):
    """The rows of an earlier run that belong to this one; refuse rows asked of other questions."""
    kept = {}
    for r in rows:
        q = r["question_index"]
        if q >= len(problems):
            continue  # an earlier run with a larger --limit: kept in the file, left out here
        if r["question"] != problems[q]["question"] or r["gold"] != problems[q]["answer"]:
            raise UserError(f"{path}: question {q} differs from the benchmark's; this directory "
                            f"holds another data set, use another --output-dir")
        kept.setdefault((q, r["sample_index"]), r)
    return list(kept.values())


def short(value, width=40):
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 4] + '..."'


def check_same_run(summary_path, samples_path, model, proto):
    """Resuming into a directory measured with another model, protocol or seed would mix two runs:
    refuse, naming each setting that differs (old -> new)."""
    if not os.path.exists(summary_path):
        if os.path.exists(samples_path):
            raise UserError(f"{samples_path} has no summary.json beside it, so how it was measured "
                            f"is unknown; use another --output-dir")
        return
    with open(summary_path) as f:
        old = json.load(f)
    old_settings = dict(old.get("protocol") or {}, model=old.get("model"))
    new_settings = dict(proto, model=model)
    differ = []
    for key in sorted(set(old_settings) | set(new_settings)):
        before, after = json.dumps(old_settings.get(key)), json.dumps(new_settings.get(key))
        if before != after:   # short values are shown: 'seed 0 -> 3'; long ones named: 'prompt'
            differ.append(f"{key} {before} -> {after}" if len(before + after) <= 60 else key)
    if differ:
        raise UserError(f"{summary_path} was measured differently ({'; '.join(differ)}); rerun "
                        f"with the same settings to resume, or use another --output-dir")


# -----------------------------------------------------------------------------
# 5. Tables: one run's benchmarks, or several runs side by side

def format_table(header, lines):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def show(key, metrics):
    """A metric as printed: rates in percent with one decimal (as papers report them)."""
    value = metrics.get(key)
    if value is None:
        return "-"
    if key in ("questions", "samples"):
        return str(value)
    return f"{value:.1f}" if key == "mean_tokens" else f"{100 * value:.1f}"


def metric_keys(all_metrics):
    passes = sorted({k for m in all_metrics for k in m if k.startswith("pass@")},
                    key=lambda k: int(k[5:]))
    return (["questions", "samples", "accuracy"] + passes
            + ["stated", "by_last_number", "truncated", "mean_tokens"])


def run_table(summaries):
    keys = metric_keys([s["metrics"] for s in summaries])
    lines = [[s["benchmark"]] + [show(k, s["metrics"]) for k in keys]
             + [s["time"]["tokens_per_second"] or "-"] for s in summaries]
    return format_table(["benchmark"] + keys + ["tok/s"], lines)


def load_summaries(directory):
    """{benchmark: summary} of a run directory (or of one benchmark's directory). An unfinished
    run (interrupted, or still running) gets no metrics and summary["unfinished"] = 'n/N
    samples'."""
    paths = [os.path.join(directory, "summary.json")]
    if os.path.isdir(directory):
        paths += [os.path.join(directory, d, "summary.json") for d in sorted(os.listdir(directory))]
    found = {}
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                summary = json.load(f)
            summary["unfinished"] = None
            if not summary.get("finished", summary["metrics"] is not None):   # or no "finished"
                done = count_rows(os.path.join(os.path.dirname(path), "samples.jsonl"))
                summary["unfinished"] = f"{done}/{summary.get('expected_samples', '?')} samples"
                summary["metrics"] = None
            summary["metrics"] = summary["metrics"] or {}
            found[summary["benchmark"]] = summary
    if not found:
        raise UserError(f"{directory}: no summary.json in it or in its sub-directories")
    return found


def compare(directories):
    """Print runs side by side, one column per run; warn where their protocols differ and mark
    unfinished runs (their metrics are not shown)."""
    runs = [load_summaries(d) for d in directories]
    names = [os.path.basename(os.path.normpath(d)) for d in directories]
    benchmarks = sorted({b for run in runs for b in run})
    lines, warnings = [], []
    for b in benchmarks:
        present = [run.get(b) for run in runs]
        lines.append([b, "model"] + [s["model"] if s else "-" for s in present])
        status = lambda s: "UNFINISHED " + s["unfinished"] if s["unfinished"] else "finished"
        lines.append(["", "status"] + [status(s) if s else "-" for s in present])
        for name, s in zip(names, present):
            if s and s["unfinished"]:
                warnings.append(f"warning: {b}: {name} is unfinished ({s['unfinished']}); rerun "
                                f"its command to finish it")
        for key in metric_keys([s["metrics"] for s in present if s]):
            lines.append(["", key] + [show(key, s["metrics"]) if s else "-" for s in present])
        protocols = [dict(s["protocol"], questions=s.get("questions",
                                                         s["metrics"].get("questions")))
                     for s in present if s]
        for key in sorted({k for p in protocols for k in p}):  # another --limit: another test
            values = [json.dumps(p.get(key)) for p in protocols]
            if len(set(values)) > 1:
                warnings.append(f"warning: {b}: runs differ in {key}: "
                                + " vs ".join(short(p.get(key)) for p in protocols))
    print(format_table(["benchmark", "metric"] + names, lines))
    for w in warnings:
        print(w)
    return warnings


# -----------------------------------------------------------------------------
# 6. The command line: every benchmark loaded first (bad input fails fast), then the model

def benchmark_name(source):
    return os.path.splitext(os.path.basename(source))[0] if os.path.splitext(source)[1] else source


def benchmark_names(sources):
    """{name: source} of --benchmarks. A name is an output folder and --compare's key, so two
    benchmarks must never share one (the second would overwrite the first's samples). An alias is
    its own name, a file its stem (fixtures/gsm8k.jsonl: gsm8k), except where stems clash: then
    each file of that stem is named folder-stem (gsm8k/test.jsonl, math500/test.jsonl: gsm8k-test,
    math500-test). Names that still clash (one file given twice) are refused, naming both."""
    stems = [benchmark_name(s) for s in sources]
    names = {}
    for source, stem in zip(sources, stems):
        name = stem
        if stems.count(stem) > 1 and name != source:      # a file whose stem another one shares
            name = f"{os.path.basename(os.path.dirname(os.path.abspath(source)))}-{stem}"
        if name in names:
            raise UserError(f"--benchmarks: {names[name]} and {source} would both be named "
                            f"'{name}' (one output folder); give each benchmark once")
        names[name] = source
    return names


def run(args):
    eksft.set_seed(args.seed)
    if args.checker != "builtin" and importlib.util.find_spec("math_verify") is None:
        raise UserError(f"--checker {args.checker} needs the math-verify package: "
                        "pip install 'math-verify[antlr4_13_2]'")
    is_equiv("1", "1", args.checker)     # starts math-verify's worker (auto) while the model loads
    names = benchmark_names([b.strip() for b in args.benchmarks.split(",") if b.strip()])
    benchmarks = {name: load_qa(source, limit=args.limit) for name, source in names.items()}
    for name, problems in benchmarks.items():
        print(f"benchmark {name}: {len(problems)} questions")
    if args.model != "tiny":
        eksft.model_source(args.model)       # a mistyped name fails now, not after a minute
    eksft.check_output_dir(args.output_dir)  # and an unwritable directory before the model loads

    backend, why = choose_backend(args.backend, args.model)
    print(f"backend: {backend} ({why})")
    if backend == "vllm":
        model, tokenizer = load_vllm(args.model, args.seed)
        dtype = "vllm's default (the checkpoint's dtype)"
    else:
        device, amp_dtype, why = eksft.pick_device(args.device, args.precision)
        dtype = amp_dtype or torch.float32
        print(f"device: {device} ({why.split(';')[0]}); weights in {dtype}")
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # its "Loading weights" bar would break the lines below
        model, tokenizer = eksft.load_model_and_tokenizer(args.model, device, dtype=dtype,
                                                          seed=args.seed)
    # bf16 and fp32 greedy completions differ, so the dtype is part of the protocol
    proto = protocol(tokenizer, args.protocol, max_new_tokens=args.max_new_tokens, seed=args.seed,
                     temperature=args.temperature, top_p=args.top_p, samples=args.samples,
                     checker=args.checker, dtype=str(dtype))
    print(f"protocol {args.protocol}: {proto['about']}; checker {proto['checker']}")
    if args.protocol == "qwen-math" and proto["prompt"] != HARNESS_PROMPT:
        print("note: this tokenizer's chat template renders another prompt than the harness's: "
              + json.dumps(proto["prompt"]))
    os.makedirs(args.output_dir, exist_ok=True)
    eksft.write_json(os.path.join(args.output_dir, "args.json"), vars(args))

    summaries = []
    for name, problems in benchmarks.items():
        out_dir = os.path.join(args.output_dir, name)
        os.makedirs(out_dir, exist_ok=True)
        samples_path = os.path.join(out_dir, "samples.jsonl")
        summary_path = os.path.join(out_dir, "summary.json")
        check_same_run(summary_path, samples_path, args.model, proto)
        summary = {"model": args.model, "benchmark": name, "protocol": proto, "finished": False,
                   "questions": len(problems), "expected_samples": len(problems) * args.samples,
                   "metrics": None, "backend": backend, "args": vars(args)}
        eksft.write_json(summary_path, summary)  # before any sample: a resume checks the protocol
        done = resumable_rows(read_rows(samples_path), problems, samples_path)
        if done:
            print(f"resume: {len(done)} samples of {name} already in {samples_path}")
        settings = PROTOCOLS[args.protocol]
        rows, metrics = evaluate_model(
            model, tokenizer, problems, samples=args.samples, temperature=args.temperature,
            top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            seed=args.seed, checker=args.checker, system_prompt=settings["system_prompt"],
            last_number=settings["last_number"], backend=backend, static_cache=args.static_cache,
            done=done, on_row=lambda row: eksft.append_jsonl(samples_path, row),
            progress=not args.no_progress)
        in_file = resumable_rows(read_rows(samples_path), problems, samples_path)  # the truth
        summary.update(finished=True, metrics=metrics_from_rows(in_file),
                       time=dict(metrics["time"], resumed_rows=len(done)))
        eksft.write_json(summary_path, summary)
        summaries.append(summary)
        for r in rows[:args.show]:
            lines = [line[:120] for line in r["completion"].strip().splitlines()[:6]]
            print(f"--- {name} question {r['question_index']} sample {r['sample_index']}: gold "
                  f"{r['gold']!r}, extracted {r['extracted']!r}, correct {r['correct']}\n"
                  + "\n".join(lines or ["(only whitespace)"]))
    print(run_table(summaries))
    print(f"(rates in %; samples per question {args.samples}; results in {args.output_dir})")
    return summaries


def parse_args(argv=None):
    p = ArgumentParser(description="Evaluate a model on math benchmarks under one protocol.",
                       formatter_class=HelpFormatter)
    add = p.add_argument
    add("--model", default="tiny", help="tiny | short name (Qwen2.5-0.5B) | hub id | local dir")
    add("--benchmarks", default=None, help="comma-separated: gsm8k, gsm8k-train, math500, "
        "synthetic, synthetic-train, or a local .jsonl/.json with question and answer fields "
        "(default: synthetic for tiny and SmolLM2, gsm8k,math500 otherwise)")
    add("--limit", type=int, default=None, help="evaluate the first N questions of each (all)")
    add("--samples", type=int, default=1, help="completions per question (avg@n, pass@k)")
    add("--temperature", type=float, default=0.0, help="0 = greedy")
    add("--top-p", type=float, default=1.0, help="nucleus sampling (temperature > 0 only)")
    add("--protocol", default="qwen-math", choices=PROTOCOLS, help="qwen-math: the Qwen2.5-Math "
        "harness (published numbers; last-number fallback, 2048 tokens); strict: the RL "
        "reward's rules (1024 tokens)")
    add("--max-new-tokens", type=int, default=None, help="completion length limit (default: the "
        "protocol's; 256 for tiny, whose synthetic solutions are under 160 characters; 512 for "
        "SmolLM2 on a CPU)")
    add("--batch-size", type=int, default=32, help="prompts per generate call")
    add("--static-cache", action="store_true", help="static KV cache: transformers compiles the "
        "decoding step on CUDA (greedy outputs unchanged)")
    add("--checker", default=default_checker(), choices=CHECKERS, help="answer equivalence: "
        "builtin rules, math-verify, or auto (builtin, then math-verify for answers with symbols)")
    add("--seed", type=int, default=0, help="sampling seed (and the tiny model's weights); "
        "recorded, a resume needs the same")
    add("--output-dir", default=None, help="samples.jsonl and summary.json per benchmark "
        "(default runs/eval-{model}[-{protocol}][-t{temperature}-n{samples}])")
    add("--backend", default="auto", choices=["auto", "transformers", "vllm"],
        help="auto: vllm if installed and a CUDA GPU is present, else transformers")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps (transformers)")
    add("--precision", default="fp32", choices=["fp32", "bf16"], help="weights dtype for "
        "transformers. fp32 keeps greedy results independent of --batch-size on a GPU too; in "
        "bf16 they are not (on an H100, 15 of 32 completions changed from batch 1 to 8)")
    add("--show", type=int, default=1, help="print this many completions per benchmark")
    add("--no-progress", action="store_true", help="no tqdm progress bar")
    add("--compare", nargs="+", metavar="DIR", help="print earlier runs side by side and exit")
    args = p.parse_args(argv)
    if args.compare:
        return args
    args.model_kind = eksft.model_kind(args.model)   # tiny, or a directory trained from it
    tiny, smol = args.model_kind == "tiny", args.model_kind == "smol"
    if args.max_new_tokens is None:   # a CPU-sized budget for the small models
        args.max_new_tokens = (256 if tiny else 512 if smol
                               else PROTOCOLS[args.protocol]["max_new_tokens"])
    require(p, args, [
        ("samples", args.samples >= 1, "at least 1"),
        ("batch_size", args.batch_size >= 1, "at least 1"),
        ("max_new_tokens", args.max_new_tokens >= 1, "at least 1"),
        ("limit", args.limit is None or args.limit >= 1, "at least 1 (leave it out for all)"),
        ("temperature", args.temperature >= 0, "0 (greedy) or more"),
        ("top_p", 0 < args.top_p <= 1, "in (0, 1]"), ("show", args.show >= 0, "0 or more")])
    if args.samples > 1 and args.temperature == 0:
        p.error("--samples > 1 needs --temperature > 0 (greedy completions are all the same)")
    if args.benchmarks is None:
        args.benchmarks = "synthetic" if tiny or smol else "gsm8k,math500"   # offline for those
    if args.output_dir is None:
        model = re.sub(r"[^A-Za-z0-9.]+", "-", args.model.rstrip("/")).strip("-")
        sampling = f"-t{args.temperature:g}-n{args.samples}" if args.temperature > 0 else ""
        protocol_name = "" if args.protocol == "qwen-math" else f"-{args.protocol}"
        args.output_dir = os.path.join("runs", f"eval-{model}{protocol_name}{sampling}")
    return args


def main(argv=None):
    args = parse_args(argv)
    return compare(args.compare) if args.compare else run(args)


if __name__ == "__main__":
    run_cli(main)
