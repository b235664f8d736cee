"""evaluate.py: pass@k against brute force, metrics and the checker by hand, batch-size invariance
of greedy (and seeded sampled) completions with a tiny model, exact resume, bad-input messages.

Expected values come from enumeration or hand computation, never from the code under test's output.
Run: python -m pytest tests/test_evaluate.py -q
"""
import doctest
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import evaluate
from data import SYSTEM_PROMPT, DataError, UserError, encode_prompt, load_qa
from eksft import ModelLoadError, load_model_and_tokenizer
from evaluate import evaluate_model, metrics_from_rows, parse_args, pass_at_k, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Generation of a 1M-parameter model is many tiny ops: on a busy 2-core machine two threads
    were 10x slower than one (they wait for each other). Restored after this file."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ----------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_brute_force(n):
    """The fraction of all k-subsets of n samples (c correct) that hold a correct one."""
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            expected = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_by_hand_and_large_n():
    assert pass_at_k(4, 1, 2) == 0.5                     # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)    # pass@1 is the fraction correct
    # 1 - C(n-c, k)/C(n, k) = 1 - prod_{i<c} (n-k-i)/(n-i): Chen et al.'s stable product form
    n, c, k = 200, 3, 50
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.prod((n - k - i) / (n - i) for i in range(c)))
    for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5), (3, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_metrics_by_hand():
    def row(q, s, correct, extracted="1", truncated=False, tokens=10):
        return {"question_index": q, "sample_index": s, "correct": correct, "extracted": extracted,
                "stated": extracted is not None, "by_last_number": False,
                "truncated": truncated, "completion_tokens": tokens}
    rows = ([row(0, s, s == 0) for s in range(4)]                          # 1 of 4 correct
            + [row(1, s, s < 2, None if s == 3 else "1", s == 3, 30) for s in range(4)])   # 2 of 4
    m = metrics_from_rows(rows)
    assert (m["questions"], m["samples"]) == (2, 4)
    assert m["accuracy"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert m["pass@1"] == pytest.approx(m["accuracy"])
    # q0: 1 - C(3,2)/C(4,2) = 1/2; q1: 1 - C(2,2)/C(4,2) = 5/6
    assert m["pass@2"] == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert m["pass@4"] == 1.0 and "pass@3" not in m
    assert m["no_answer"] == pytest.approx(1 / 8) and m["truncated"] == pytest.approx(1 / 8)
    assert m["mean_tokens"] == pytest.approx((4 * 10 + 4 * 30) / 8)
    assert evaluate.ks_for(6) == [1, 2, 4, 6] and evaluate.ks_for(8) == [1, 2, 4, 8]


def test_stated_and_fallback_shares_by_hand():
    """stated and by_last_number over completions, under qwen-math's fallback: rows as score_row
    writes them, and rows of an older run without the fields, graded again from their completion
    (their 'correct' is the run's own)."""
    def row(q, completion, correct, **fields):
        return dict({"question_index": q, "sample_index": 0, "gold": "8", "completion": completion,
                     "correct": correct, "truncated": False, "completion_tokens": 5}, **fields)
    rows = [row(0, "so \\boxed{8}", True, stated=True, by_last_number=False),
            row(1, "so she has 8 pens", True, stated=False, by_last_number=True),
            row(2, "the answer is 7", False, stated=True, by_last_number=False),
            row(3, "8 8 8 8 8 8 8 8", True),          # old rows: not stated, right by its last number
            row(4, "The answer is 8.", True),         # stated
            row(5, "I do not know.", False)]          # neither
    m = metrics_from_rows(rows)
    assert m["stated"] == pytest.approx(3 / 6) and m["no_answer"] == pytest.approx(3 / 6)
    assert m["by_last_number"] == pytest.approx(2 / 6) and m["accuracy"] == pytest.approx(4 / 6)
    assert m["accuracy"] - m["by_last_number"] == pytest.approx(2 / 6)   # the stated answers' score


def test_doctests():
    assert doctest.testmod(evaluate).failed == 0


# ----------------------------------------------------------------------------
# the checker and the prompt are rl.py's and data.py's


def test_checker_and_prompt_integration(monkeypatch):
    from eksft import char_tokenizer
    tokenizer = char_tokenizer()
    problems = [{"question": "What is 3+4?", "answer": "7"},
                {"question": "Half of one?", "answer": "0.5"},
                {"question": "How many legs do 3 spiders have?", "answer": "24"},
                {"question": "2*3?", "answer": "6"}]
    replies = {"What is 3+4?": "3+4 = 7, so \\boxed{7}.",
               "Half of one?": "The answer is \\frac{1}{2}",        # equivalent to 0.5
               "How many legs do 3 spiders have?": "I do not know.",  # no answer at all
               "2*3?": "\\boxed{5}"}                                   # wrong
    seen = []

    def fake_generate(model, tok, prompt_ids, *, max_new_tokens, temperature, top_p, batch_size, seed,
                      static_cache=False):
        out = []
        for ids in prompt_ids:
            text = tok.decode(ids)
            seen.append(ids)
            question = next(q for q in replies if q in text)
            out.append({"completion_ids": [1] * 3, "text": replies[question], "truncated": False})
        return out

    monkeypatch.setattr(evaluate, "generate_completions", fake_generate)
    rows, metrics = evaluate_model(None, tokenizer, problems, max_new_tokens=8, progress=False)
    assert [(r["extracted"], r["correct"]) for r in rows] == [
        ("7", True), ("\\frac{1}{2}", True), (None, False), ("5", False)]
    assert [r["gold"] for r in rows] == ["7", "0.5", "24", "6"]
    assert metrics["accuracy"] == 0.5 and metrics["no_answer"] == 0.25
    # the prompts are exactly data.encode_prompt's: system prompt asking for \boxed{}, chat template
    assert sorted(seen) == sorted(encode_prompt(tokenizer, p["question"]) for p in problems)
    assert SYSTEM_PROMPT in tokenizer.decode(seen[0]) and "\\boxed{}" in SYSTEM_PROMPT
    assert "<|im_start|>assistant\n" in tokenizer.decode(seen[0])


# ----------------------------------------------------------------------------
# protocols: the Qwen2.5-Math harness's prompt and extraction, and the strict one

# the harness's qwen25-math-cot prompt, as its template writes it (question as the user turn)
HARNESS = ("<|im_start|>system\nPlease reason step by step, and put your final answer within "
           "\\boxed{}.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
QWEN_TEMPLATE = os.path.join(ROOT, "..", "shared", "fixtures", "qwen2.5_chat_template.jinja")


def test_qwen25_chat_template_renders_the_harness_prompt():
    if not os.path.exists(QWEN_TEMPLATE):
        pytest.skip(f"{QWEN_TEMPLATE} is absent (the fixture lives outside this repository)")
    from eksft import char_tokenizer
    tokenizer = char_tokenizer()
    with open(QWEN_TEMPLATE) as f:
        tokenizer.chat_template = f.read()                   # Qwen2.5's own template
    proto = evaluate.protocol(tokenizer, "qwen-math", max_new_tokens=2048, temperature=0.0, top_p=1.0,
                              samples=1, checker="builtin", seed=0, dtype="torch.float32")
    assert proto["prompt"] == HARNESS
    question = "Natalia sold clips to 48 of her friends in April. How many {clips}?"
    text = HARNESS.replace("{question}", question)
    assert encode_prompt(tokenizer, question, proto["system_prompt"]) == tokenizer(
        text, add_special_tokens=False)["input_ids"]
    assert evaluate.HARNESS_PROMPT == HARNESS                 # what run() checks other templates against


def fake_generate(replies):
    """A stand-in for rl.generate_completions answering each question with a fixed text."""
    def generate(model, tok, prompt_ids, *, max_new_tokens, temperature, top_p, batch_size, seed,
                 static_cache=False):
        texts = [tok.decode(ids) for ids in prompt_ids]
        return [{"completion_ids": [1, 2], "truncated": False,
                 "text": next(r for q, r in replies.items() if q in t)} for t in texts]
    return generate


def test_protocols_differ_only_where_the_harness_falls_back_to_the_last_number(monkeypatch, tmp_path):
    replies = {"3+4?": "3 + 4 = 7, so \\boxed{7}.",               # boxed: right in both
               "Pens?": "She had 5 pens and buys 3, so she has 8 pens.",   # no stated answer, last number 8
               "Apples?": "There are 6 apples. So 2 + 4 = 6, done",        # last number 6, gold 7
               "Legs?": "I do not know."}                                    # no number at all
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in zip(replies, ["7", "8", "7", "24"])))
    monkeypatch.setattr(evaluate, "generate_completions", fake_generate(replies))
    results = {}
    for name in ("qwen-math", "strict"):
        out = str(tmp_path / name)
        run(parse_args(["--benchmarks", str(data), "--output-dir", out, "--protocol", name, "--no-progress",
                        "--show", "0", "--checker", "builtin"]))
        rows = sorted(read_jsonl(os.path.join(out, "qa", "samples.jsonl")), key=lambda r: r["question_index"])
        results[name] = [(r["extracted"], r["correct"]) for r in rows]
        assert [(r["stated"], r["by_last_number"]) for r in rows] == [
            (True, False), (False, name == "qwen-math"), (False, False), (False, False)]
        summary = json.load(open(os.path.join(out, "qa", "summary.json")))
        metrics = summary["metrics"]                # the no-answer failure, under both protocols
        assert (metrics["stated"], metrics["no_answer"]) == (0.25, 0.75)
        assert metrics["by_last_number"] == (0.25 if name == "qwen-math" else 0.0)
        proto = summary["protocol"]
        assert proto["name"] == name and proto["system_prompt"] == SYSTEM_PROMPT and proto["shots"] == 0
        assert (proto["temperature"], proto["top_p"], proto["samples"], proto["seed"]) == (0.0, None, 1, 0)
        assert proto["max_new_tokens"] == 256                 # tiny's default, whatever the protocol
        assert proto["dtype"] == "torch.float32" and "builtin" in proto["checker"]
        assert ("last number" in proto["extraction"]) == (name == "qwen-math")
        assert summary["finished"] and summary["expected_samples"] == 4
    assert results["qwen-math"] == [("7", True), ("8", True), ("6", False), (None, False)]
    assert results["strict"] == [("7", True), (None, False), (None, False), (None, False)]
    assert parse_args(["--model", "Qwen2.5-0.5B"]).max_new_tokens == 2048       # the harness's budget
    assert parse_args(["--model", "Qwen2.5-0.5B", "--protocol", "strict"]).max_new_tokens == 1024


def test_resume_refuses_another_protocol_seed_or_unknown_origin(tmp_path):
    out = str(tmp_path / "eval")
    argv = ["--benchmarks", "synthetic", "--limit", "2", "--max-new-tokens", "4", "--output-dir", out,
            "--no-progress", "--show", "0", "--checker", "builtin"]
    run(parse_args(argv))
    for extra, expected in ((["--protocol", "strict"], 'name "qwen-math" -> "strict"'),
                            (["--seed", "1"], "seed 0 -> 1"),
                            (["--checker", "math-verify"], "checker")):
        with pytest.raises(UserError) as refused:
            run(parse_args(argv + extra))
        assert expected in str(refused.value) and "\n" not in str(refused.value)
    run(parse_args(argv))                                      # the same settings resume
    os.remove(os.path.join(out, "synthetic", "summary.json"))
    with pytest.raises(UserError, match="no summary.json beside it"):
        run(parse_args(argv))


def test_two_files_of_one_name_get_two_names(tmp_path):
    """gsm8k/test.jsonl and math500/test.jsonl are both 'test' by their stem: each is named by its
    folder too, so both results are kept (neither overwrites the other)."""
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    for name in ("gsm8k", "math500"):
        (tmp_path / name).mkdir()
        shutil.copy(os.path.join(fixtures, f"{name}.jsonl"), tmp_path / name / "test.jsonl")
    gsm8k, math500 = (str(tmp_path / name / "test.jsonl") for name in ("gsm8k", "math500"))
    out = str(tmp_path / "eval")
    summaries = run(parse_args(["--benchmarks", f"{gsm8k},{math500},synthetic", "--limit", "2",
                                "--max-new-tokens", "4", "--output-dir", out, "--no-progress",
                                "--show", "0", "--checker", "builtin"]))
    assert [s["benchmark"] for s in summaries] == ["gsm8k-test", "math500-test", "synthetic"]
    for name, source in (("gsm8k-test", gsm8k), ("math500-test", math500)):
        with open(os.path.join(out, name, "samples.jsonl")) as f:
            rows = sorted((json.loads(line) for line in f), key=lambda r: r["question_index"])
        assert [r["question"] for r in rows] == [r["question"] for r in load_qa(source, limit=2)]
    assert sorted(evaluate.load_summaries(out)) == ["gsm8k-test", "math500-test", "synthetic"]
    # a lone file keeps its stem; an alias keeps its name beside a file of that stem
    assert evaluate.benchmark_names([gsm8k]) == {"test": gsm8k}
    assert evaluate.benchmark_names(["gsm8k", "data/gsm8k.jsonl"]) == {
        "gsm8k": "gsm8k", "data-gsm8k": "data/gsm8k.jsonl"}


def test_one_benchmark_given_twice_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "eval"
    source = os.path.join(ROOT, "tests", "fixtures", "gsm8k.jsonl")
    for benchmarks in (f"{source},{source}", "synthetic,synthetic"):
        with pytest.raises(UserError) as refused:
            run(parse_args(["--benchmarks", benchmarks, "--output-dir", str(out)]))
        assert "would both be named" in str(refused.value) and "\n" not in str(refused.value)
    assert not out.exists()


# ----------------------------------------------------------------------------
# generation with a tiny model whose greedy outputs differ from prompt to prompt


@pytest.fixture(scope="module")
def chaotic(tmp_path_factory):
    """The tiny model with large random weights (the default init writes the same token for every
    prompt, which would make invariance tests pass trivially), also saved as a checkpoint dir."""
    model, tokenizer = load_model_and_tokenizer("tiny", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=generator)
    path = str(tmp_path_factory.mktemp("ckpt"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


def completions(rows):
    return {(r["question_index"], r["sample_index"]): r["completion"] for r in rows}


def test_greedy_does_not_depend_on_batch_size(chaotic):
    model, tokenizer, _ = chaotic
    problems = load_qa("synthetic", limit=5)       # prompts of different lengths: padding differs
    lengths = {len(encode_prompt(tokenizer, p["question"])) for p in problems}
    assert len(lengths) > 2
    by_size = {bs: evaluate_model(model, tokenizer, problems, max_new_tokens=12, batch_size=bs,
                                  progress=False)[0] for bs in (1, 2, 5)}
    assert len(set(completions(by_size[1]).values())) == 5     # not trivially equal
    assert completions(by_size[1]) == completions(by_size[2]) == completions(by_size[5])
    assert [r["question"] for r in by_size[2]] == [p["question"] for p in problems]  # rows in order


def test_sampling_is_seeded_per_question(chaotic):
    model, tokenizer, _ = chaotic
    problems = load_qa("synthetic", limit=3)
    kw = dict(samples=3, temperature=1.0, max_new_tokens=6, progress=False)
    a, metrics = evaluate_model(model, tokenizer, problems, batch_size=3, seed=0, **kw)
    b, _ = evaluate_model(model, tokenizer, problems, batch_size=16, seed=0, **kw)
    c, _ = evaluate_model(model, tokenizer, problems[:2], batch_size=3, seed=0, **kw)   # --limit 2
    d, _ = evaluate_model(model, tokenizer, problems, batch_size=3, seed=1, **kw)
    assert completions(a) == completions(b)
    assert completions(c) == {k: v for k, v in completions(a).items() if k[0] < 2}
    assert completions(a) != completions(d)
    assert len(set(completions(a).values())) == 9 and metrics["samples"] == 3
    # resume inside a question: the missing sample comes back exactly as it was
    partial = [r for r in a if (r["question_index"], r["sample_index"]) != (1, 1)]
    e, metrics_e = evaluate_model(model, tokenizer, problems, batch_size=3, seed=0, done=partial, **kw)
    assert completions(e) == completions(a) and metrics_e["time"]["new_rows"] == 1
    with pytest.raises(ValueError):
        evaluate_model(model, tokenizer, problems, samples=2, temperature=0.0, progress=False)


# ----------------------------------------------------------------------------
# the command line: outputs, exact resume, protocol check, compare


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_cli_resume_skips_finished_samples(chaotic, tmp_path, capsys):
    _, _, checkpoint = chaotic
    out = str(tmp_path / "eval")
    argv = ["--model", checkpoint, "--benchmarks", "synthetic", "--limit", "6", "--max-new-tokens", "12",
            "--batch-size", "4", "--output-dir", out, "--no-progress", "--show", "0"]
    run(parse_args(argv))
    path = os.path.join(out, "synthetic", "samples.jsonl")
    first = read_jsonl(path)
    assert sorted((r["question_index"], r["sample_index"]) for r in first) == [(q, 0) for q in range(6)]
    assert set(first[0]) >= {"question", "gold", "completion", "extracted", "correct"}

    # keep 3 rows, marked so that regenerating them would show, and a line cut by a crash
    kept = [dict(r, completion="SENTINEL \\boxed{%s}" % r["gold"], extracted=r["gold"], correct=True)
            for r in first[:3]]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.write('{"question_index": 5, "sample_ind')
    run(parse_args(argv))
    second = read_jsonl(path)                                          # every line parses
    assert second[:3] == kept                                          # not regenerated
    assert sorted(map(json.dumps, second[3:])) == sorted(map(json.dumps, first[3:]))  # redone exactly
    summary = json.load(open(os.path.join(out, "synthetic", "summary.json")))
    assert summary["metrics"]["questions"] == 6
    assert summary["metrics"]["accuracy"] == pytest.approx(sum(r["correct"] for r in second) / 6)
    assert summary["metrics"]["accuracy"] >= 0.5                       # the 3 kept rows count
    assert (summary["time"]["resumed_rows"], summary["time"]["new_rows"]) == (3, 3)
    assert summary["protocol"]["max_new_tokens"] == 12 and summary["protocol"]["samples"] == 1
    assert SYSTEM_PROMPT in summary["protocol"]["prompt"]

    run(parse_args(argv))                                              # finished: nothing to do
    assert read_jsonl(path) == second
    printed = capsys.readouterr().out
    assert "benchmark" in printed and "accuracy" in printed and "resume: 6 samples" in printed

    with pytest.raises(UserError, match="max_new_tokens"):            # another protocol: refused
        run(parse_args([a if a != "12" else "13" for a in argv]))


def write_summary(directory, benchmark, accuracy, temperature, questions=4):
    os.makedirs(os.path.join(directory, benchmark))
    summary = {"model": os.path.basename(directory), "benchmark": benchmark,
               "protocol": {"temperature": temperature, "max_new_tokens": 64},
               "metrics": {"questions": questions, "samples": 1, "accuracy": accuracy, "pass@1": accuracy},
               "time": {"tokens_per_second": 1.0}}
    with open(os.path.join(directory, benchmark, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_compare_prints_side_by_side_and_warns(tmp_path, capsys):
    base, rl_run = str(tmp_path / "base"), str(tmp_path / "rl")
    write_summary(base, "gsm8k", 0.25, 0.0)
    write_summary(rl_run, "gsm8k", 0.75, 0.6)
    warnings = evaluate.compare([base, rl_run])
    printed = capsys.readouterr().out
    accuracy_line = next(line for line in printed.splitlines() if "accuracy" in line)
    assert accuracy_line.split()[-2:] == ["25.0", "75.0"]
    assert len(warnings) == 1 and "temperature" in warnings[0] and "max_new_tokens" not in warnings[0]
    write_summary(str(tmp_path / "same"), "gsm8k", 0.5, 0.0)
    assert evaluate.compare([base, str(tmp_path / "same")]) == []
    write_summary(str(tmp_path / "fewer"), "gsm8k", 0.5, 0.0, questions=3)
    assert "questions" in evaluate.compare([base, str(tmp_path / "fewer")])[0]
    with pytest.raises(UserError, match="no summary.json"):
        evaluate.compare([str(tmp_path)])


def test_compare_marks_unfinished_runs(tmp_path, capsys):
    done, cut, old = str(tmp_path / "done"), str(tmp_path / "cut"), str(tmp_path / "old")
    write_summary(done, "gsm8k", 0.5, 0.0)
    write_summary(cut, "gsm8k", 0.9, 0.0)
    write_summary(old, "gsm8k", 0.9, 0.0)
    for directory, extra in ((cut, {"finished": False, "expected_samples": 4}), (old, {})):
        path = os.path.join(directory, "gsm8k", "summary.json")
        summary = dict(json.load(open(path)), metrics=None, **extra)   # old: a file without "finished"
        json.dump(summary, open(path, "w"))
        with open(os.path.join(directory, "gsm8k", "samples.jsonl"), "w") as f:
            f.writelines(json.dumps({"question_index": q, "sample_index": 0}) + "\n" for q in range(3))
            f.write('{"question_index": 3, "sam')               # being written right now
    warnings = evaluate.compare([done, cut, old])
    printed = capsys.readouterr().out
    status = next(line for line in printed.splitlines() if "status" in line)
    assert status.split()[1:] == ["finished", "UNFINISHED", "3/4", "samples", "UNFINISHED", "3/?", "samples"]
    accuracy = next(line for line in printed.splitlines() if "accuracy" in line)
    assert accuracy.split()[1:] == ["50.0", "-", "-"]          # no numbers from a run that is not done
    assert any("cut is unfinished (3/4 samples)" in w for w in warnings)
    assert any("old is unfinished" in w for w in warnings)
    with open(os.path.join(cut, "gsm8k", "samples.jsonl")) as f:
        assert f.read().endswith('"sam')                        # --compare only reads


# ----------------------------------------------------------------------------
# bad input: one clear message, non-zero exit


def test_bad_inputs_are_clear_errors(tmp_path):
    out = ["--output-dir", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(UserError, match="unknown question/answer set 'nosuch'"):
        run(parse_args(["--benchmarks", "synthetic,nosuch"] + out))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, row 2: missing field 'answer'"):
        run(parse_args(["--benchmarks", str(bad)] + out))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        run(parse_args(["--model", str(empty), "--benchmarks", "synthetic", "--limit", "1"] + out))
    with pytest.raises(UserError, match="--samples > 1 needs"):         # greedy n > 1
        parse_args(["--samples", "4"])


def test_cli_error_is_one_line_and_non_zero(tmp_path):
    proc = subprocess.run([sys.executable, "evaluate.py", "--benchmarks", "nosuch",
                           "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown question/answer set 'nosuch'")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------
# the optional vLLM backend (not installed here): the choice, and a seed per sample


def test_backend_choice(monkeypatch):
    installed = {"vllm": None}
    monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda name: installed.get(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluate.choose_backend("auto", "Qwen2.5-0.5B")[0] == "transformers"   # not installed
    installed["vllm"] = object()
    assert evaluate.choose_backend("auto", "Qwen2.5-0.5B")[0] == "vllm"
    assert evaluate.choose_backend("auto", "tiny")[0] == "transformers"
    assert evaluate.choose_backend("transformers", "Qwen2.5-0.5B")[0] == "transformers"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluate.choose_backend("auto", "Qwen2.5-0.5B")[0] == "transformers"


def test_vllm_path_seeds_every_sample(monkeypatch):
    """A stand-in for vllm whose 'completion' is a function of the request's seed alone."""
    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm):
            assert len(prompts) == len(params) and all("prompt_token_ids" in p for p in prompts)
            assert all(p.n == 1 and p.max_tokens == 8 and p.stop_token_ids for p in params)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                token_ids=[1, 2], text=f"\\boxed{{{p.seed % 7}}}", finish_reason="stop")]) for p in params]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams))
    from eksft import char_tokenizer
    tokenizer = char_tokenizer()
    problems = [{"question": f"q{i}", "answer": "3"} for i in range(3)]
    kw = dict(samples=4, temperature=1.0, max_new_tokens=8, seed=5, backend="vllm", progress=False)
    a, _ = evaluate_model(FakeLLM(), tokenizer, problems, batch_size=2, **kw)
    b, _ = evaluate_model(FakeLLM(), tokenizer, problems, batch_size=12, **kw)
    assert completions(a) == completions(b)
    for r in a:   # the seed of (--seed, question, sample), whatever the batch
        expected = evaluate.derived_seed(5, r["question_index"], r["sample_index"]) % 7
        assert r["completion"] == f"\\boxed{{{expected}}}"
        assert r["correct"] == (expected == 3)
