"""tutorial/tiny_lab.py: the --quick pipeline end to end (as CI runs it), its files, and the plots."""
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tutorial"))

import tiny_lab  # noqa: E402

# a guard against a hang, not a timing test: --quick takes about a minute on 2 idle cores, and ten
# times that on a machine loaded with other jobs
HANG_GUARD_S = 1800


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `tiny_lab.py --quick` in a subprocess, with matplotlib made unimportable: the
    no-matplotlib path must finish and say so. Returns (output dir, stdout, seconds)."""
    out = tmp_path_factory.mktemp("lab")
    fake = tmp_path_factory.mktemp("no_matplotlib")
    (fake / "matplotlib").mkdir()
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('simulated: no matplotlib')\n")
    # one thread: a tiny model gains nothing from two, and two spinning threads per process on a
    # shared 2-core machine slowed this run 5x and more
    env = dict(os.environ, PYTHONPATH=str(fake), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tutorial", "tiny_lab.py"), "--quick",
                           "--output-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, seconds


def run_lab(argv, env_threads="1"):
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=env_threads)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tutorial", "tiny_lab.py"), *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quick_run_writes_a_well_formed_table(quick_run):
    out, stdout, seconds = quick_run
    print(f"tiny_lab.py --quick took {seconds:.0f} s")
    report = json.loads((out / "results.json").read_text())
    names = [tiny_lab.NAMES[m] for m in report["methods"]]
    assert {"SFT", "EKSFT"} <= set(names)
    assert report["rows"] == ["base"] + names + [f"{n}+RL" for n in names]
    k = report["pass_k"]
    for name in report["rows"]:
        row = report["summary"][name]
        for key in ("accuracy", "no_answer", "prose_accuracy", "pass@1", f"pass@{k}"):
            assert 0.0 <= row[key]["mean"] <= 1.0, (name, key)
        for key in ("kl_prose", "kl_chat"):
            assert row[key]["mean"] >= -1e-6, (name, key)  # KL >= 0 up to float rounding
        assert row["entropy_chat"]["mean"] > 0
        passes = [row[f"pass@{j}"]["mean"] for j in tiny_lab.evaluate.ks_for(k)]
        assert passes == sorted(passes), (name, passes)  # pass@k never falls as k grows
        assert row["pass@1"]["std"] == 0.0  # one seed: no spread
        # the per-question results the statistics use agree with the table
        right = report["per_question"][0][name]["accuracy"]
        assert len(right) == report["held_out_questions"]
        assert sum(right) / len(right) == pytest.approx(row["accuracy"]["mean"])
    base = report["summary"]["base"]
    assert abs(base["kl_prose"]["mean"]) < 1e-5 and abs(base["kl_chat"]["mean"]) < 1e-5  # KL(base||base)

    table = (out / "results.md").read_text()
    lines = [l for l in table.split("\n\n")[2].splitlines() if l.startswith("|")]   # the main table
    assert len(lines) == 2 + len(report["rows"]) and all(l.count("|") == lines[0].count("|") for l in lines)
    for name in report["rows"]:
        assert any(l.startswith(f"| {name} |") for l in lines)
    command = f"python tutorial/tiny_lab.py --quick --output-dir {out}"
    assert report["command"] == command and table.startswith(f"`{command}`")   # every flag
    import datasets
    import transformers
    assert (f"1 torch thread(s), jobs 1, python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, datasets {datasets.__version__}") in table
    assert report["machine"]["torch_threads"] == 1
    assert set(report["machine"]) >= {"python", "torch", "transformers", "datasets", "platform"}
    assert table.split("\n\n")[2].strip() in stdout  # the printed table is the saved one
    # the planned and the real wall time, printed and saved
    assert re.search(r"planned wall time: \d+ min", stdout)
    assert re.search(r"wall time [\d.]+ min \(planned at most \d+ min\)", table)
    assert report["seconds"]["planned"] > 0 and report["seconds"]["total"] > 0
    # RL: one line per method and seed saying whether held-out accuracy fell
    assert len(report["rl_changes"]) == len(names)
    for change in report["rl_changes"]:
        assert change["fell"] == (change["after"] < change["before"])
        assert f"seed 0, {change['method']}: {change['before']} -> {change['after']} of" in table


def test_quick_run_pretrains_to_the_convergence_rule(quick_run):
    out, _, _ = quick_run
    report = json.loads((out / "results.json").read_text())
    cfg = report["settings"]
    record = report["pretraining"][0]
    scores = [e["prose_accuracy"] for e in record["evals"] if not e["cooldown"]]
    stop = [e["step"] for e in record["evals"] if not e["cooldown"]][-1]
    # the stable phase ends at the first evaluation where the rule holds (or at the step cap) ...
    assert record["converged"] == tiny_lab.converged(scores, cfg["pretrain_patience"], cfg["pretrain_tolerance"])
    assert not any(tiny_lab.converged(scores[:i], cfg["pretrain_patience"], cfg["pretrain_tolerance"])
                   for i in range(1, len(scores)))
    assert record["converged"] or stop == cfg["pretrain_max_steps"]
    # ... then the cooldown, whose last step is evaluated too
    assert record["steps"] == stop + round(cfg["pretrain_cooldown"] * stop)
    assert record["evals"][-1] == {**record["evals"][-1], "step": record["steps"], "cooldown": True}
    curves = json.loads((out / "curves.json").read_text())
    lrs = [r["lr"] for r in curves["pretrain"][0]]
    assert len(lrs) == record["steps"] and lrs[stop - 1] == cfg["pretrain_lr"] and lrs[-1] < lrs[stop]


def test_quick_run_sets_are_disjoint(quick_run):
    """SFT set, validation set, held-out set and RL questions: no question in two of them."""
    out, _, _ = quick_run
    report = json.loads((out / "results.json").read_text())
    cfg = report["settings"]
    held_out = tiny_lab.held_out_problems(cfg, cfg["regime"])
    validation = tiny_lab.validation_problems(cfg, cfg["regime"], held_out)
    assert len(validation) == report["validation_questions"] == cfg["val_questions"]
    sets = {"held-out": {p["question"] for p in held_out}, "validation": {p["question"] for p in validation},
            "SFT": {json.loads(l)["problem"] for l in open(out / "seed0" / "sft_data.jsonl")},
            "RL": {json.loads(l)["question"] for l in open(out / "seed0" / "rl_data.jsonl")}}
    assert len(sets["SFT"]) == cfg["sft_examples"]
    for a in sets:
        for b in sets:
            assert a == b or not sets[a] & sets[b], (a, b)


def test_quick_run_selects_the_best_validation_score(quick_run):
    out, stdout, _ = quick_run
    report = json.loads((out / "results.json").read_text())
    cfg = report["settings"]
    assert report["methods"] == ["sft", "dft", "eksft"]   # eksft.py offers all three: none skipped
    for method in report["methods"]:
        name = tiny_lab.NAMES[method]
        grid = report["grid"][0][name]
        # every learning rate, a checkpoint per epoch: the same budget for every method
        assert sorted({c["lr"] for c in grid}) == sorted(cfg["sft_lrs"]) and len(cfg["sft_lrs"]) >= 3
        assert len(grid) == len(cfg["sft_lrs"]) * cfg["sft_epochs"]
        chosen = report["selection"][0][name]
        assert chosen["val_correct"] == max(c["val_correct"] for c in grid)
        assert chosen == tiny_lab.select([tiny_lab.Candidate(**c) for c in grid])._asdict()
        assert os.path.isdir(chosen["path"])    # RL started from it; the others are deleted
        assert [c for c in grid if os.path.isdir(c["path"])] == [chosen]
        rl_args = json.loads((out / "seed0" / f"{method}-rl" / "args.json").read_text())
        assert rl_args["model"] == chosen["path"]
        assert f"selected: {name} lr {chosen['lr']:g} step {chosen['step']}" in stdout
        edge = " (an edge of the grid)" if chosen["lr"] in (min(cfg["sft_lrs"]), max(cfg["sft_lrs"])) else ""
        assert f"- seed 0, {name}: lr {chosen['lr']:g}{edge}, step {chosen['step']}, " in stdout


def test_quick_run_without_matplotlib_says_so(quick_run):
    out, stdout, _ = quick_run
    assert "matplotlib is not installed" in stdout
    assert not list(out.glob("*.png"))
    report = json.loads((out / "results.json").read_text())
    curves = json.loads((out / "curves.json").read_text())
    assert curves["pretrain"][0] and set(curves["per_seed"][0]) == set(report["rows"]) - {"base"}


def test_quick_run_shows_the_mask(quick_run):
    _, stdout, _ = quick_run
    assert "legend: <<prompt>> trained [E:masked by entropy]" in stdout
    assert "[E:" in stdout  # at least one token dropped for its entropy


def test_plots_are_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    rows = ["base", "SFT", "DFT", "EKSFT", "SFT+RL", "DFT+RL", "EKSFT+RL"]
    per_seed = [{name: {"accuracy": 0.1 * i + s, "prose_accuracy": 0.5 - 0.1 * i, "kl_prose": 0.01 * i, "kl_chat": 0.02 * i}
                 for i, name in enumerate(rows)} for s in (0.0, 0.05)]
    summary = tiny_lab.summarise(per_seed)
    curves = {"SFT": [{"step": 1, "entropy": 0.3, "ce": 2.0}, {"step": 2, "entropy": 0.2, "ce": 1.5}],
              "EKSFT": [{"step": 1, "entropy": 0.3, "ce": 2.1, "masked_frac": 0.2},
                        {"step": 2, "entropy": 0.25, "ce": 1.7, "masked_frac": 0.35}],
              "SFT+RL": [{"step": 1, "reward": 0.1}], "EKSFT+RL": [{"step": 1, "reward": 0.2}]}
    paths = tiny_lab.save_plots(summary, curves, str(tmp_path))
    assert len(paths) == 2
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_summary_mean_and_spread():
    per_seed = [{name: {"accuracy": v} for name in ("base", "SFT", "EKSFT")} for v in (0.2, 0.4, 0.6)]
    stat = tiny_lab.summarise(per_seed)["SFT"]["accuracy"]
    assert stat["mean"] == pytest.approx(0.4) and stat["std"] == pytest.approx(0.2)
    assert stat["values"] == [0.2, 0.4, 0.6]


def test_cells_show_every_seed_and_the_counts():
    stat = {"mean": 25 / 128, "std": 0.1, "values": [14 / 128, 17 / 128, 44 / 128]}
    assert tiny_lab.cell(stat, "count", 128) == "19.5 ± 10.0 (14, 17, 44 of 128)"
    assert tiny_lab.cell(stat, "pct", 128) == "19.5 ± 10.0 (10.9, 13.3, 34.4)"
    assert tiny_lab.cell({"mean": 0.03, "std": 0.0, "values": [0.03]}, "num", 128) == "0.030"
    assert tiny_lab.cell({"mean": 0.25, "std": 0.0, "values": [0.25]}, "count", 16) == "25.0 (4 of 16)"


def test_prose_has_the_skill_but_not_the_format():
    problem = tiny_lab.data.synthetic_problems(1, seed=3)[0]
    text = tiny_lab.prose(problem)
    assert text.startswith(problem["question"])
    assert re.search(rf"So \w+ has {problem['answer']} \w+ now\.$", text)
    assert "\\boxed" not in text and "answer" not in text.lower()
    assert tiny_lab.rl.extract_answer(text) is None  # the checker finds no answer in pre-training text


def test_rerun_reuses_the_base_and_gives_the_same_numbers(quick_run):
    """Again with a second seed, on the first run's base (--bases), with OMP_NUM_THREADS=2 in the
    environment (the lab sets its own thread count): seed 0's numbers must be identical, not merely
    close, and seed 1 pre-trains a base of its own."""
    out, _, _ = quick_run
    again = out.parent / (out.name + "-again")
    run_lab(["--quick", "--seeds", "2", "--bases", str(out), "--output-dir", str(again)], env_threads="2")
    first = json.loads((out / "results.json").read_text())
    second = json.loads((again / "results.json").read_text())
    assert [p["reused"] for p in second["pretraining"]] == [True, False]
    assert second["per_seed"][0] == first["per_seed"][0]
    assert second["per_question"][0] == first["per_question"][0]
    assert second["mask_by_kind"][0] == first["mask_by_kind"][0]
    strip = lambda grid: {n: [(c["lr"], c["step"], c["val_correct"]) for c in g] for n, g in grid.items()}
    assert strip(second["grid"][0]) == strip(first["grid"][0])
    # per-seed bases: seed 1's own weights, pre-trained in this run's directory
    weights = [(d / "base" / "model.safetensors").read_bytes() for d in (out / "seed0", again / "seed1")]
    assert weights[0] != weights[1]
    assert not (again / "seed0" / "base").exists()
    # two seeds: a mean, a spread and each seed's value in every cell
    table = (again / "results.md").read_text().split("\n\n")[2]
    base_row = next(l for l in table.splitlines() if l.startswith("| base |"))
    assert base_row.count(" ± ") == 8 and re.search(r"\(\d+, \d+ of 16\)", base_row)


def test_pretraining_is_reproducible_and_seeded():
    """The stage a rerun with --bases skips: two short pre-trainings with one seed give identical
    weights, another seed other weights."""
    cfg = dict(tiny_lab.QUICK, pretrain_problems=200, pretrain_max_steps=3, pretrain_eval_every=2,
               pretrain_patience=3, block_size=64, hidden_size=32, num_layers=1, max_new_tokens=8)
    tokenizer = tiny_lab.eksft.char_tokenizer()
    problems = tiny_lab.data.synthetic_problems(2, seed=5)
    weights = []
    for seed in (0, 0, 1):
        model, curve = tiny_lab.pretrain(cfg, tokenizer, torch.device("cpu"), seed, problems, log=lambda *_: None)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    # evaluations at step 2 and at the cap (3); the rule cannot fire on two scores with patience 3,
    # so the cap starts the cooldown of round(0.2 * 3) = 1 step, evaluated at its end
    assert [e["step"] for e in curve["evals"]] == [2, 3, 4] and not curve["converged"]
    assert curve["steps"] == len(curve["losses"]) == 4


@pytest.mark.parametrize("scores, patience, tolerance, expected", [
    ([], 3, 0.04, False),                              # nothing measured yet
    ([0.5, 0.5, 0.5], 3, 0.04, False),                 # no evaluation before the last `patience`
    ([0.1, 0.5, 0.52, 0.5], 3, 0.04, False),           # 0.5 beats the best before it (0.1)
    ([0.7, 0.64, 0.58, 0.62], 3, 0.04, True),          # noisy after its peak: nothing beats 0.7
    ([0.7, 0.64, 0.74, 0.62], 3, 0.04, True),          # 0.74 is within the tolerance of 0.7
    ([0.7, 0.64, 0.75, 0.62], 3, 0.04, False),         # 0.75 beats 0.7 by more than the tolerance
    ([0.06, 0.11, 0.11, 0.11, 0.28], 3, 0.04, False),  # a plateau on the way up, then a rise
    ([0.06, 0.11, 0.11, 0.11], 2, 0.04, True),         # ... which a short patience takes as the end
    ([0.8, 0.4, 0.4], 2, 0.0, True),                   # a drop is not progress
    ([0.0, 0.0, 0.0], 2, 0.04, True),                  # a model that learns nothing (min steps guard)
])
def test_convergence_rule(scores, patience, tolerance, expected):
    assert tiny_lab.converged(scores, patience, tolerance) is expected


def test_learning_rate_warmup_constant_cooldown():
    cfg = dict(tiny_lab.FULL, pretrain_lr=1.0, pretrain_warmup=4)
    assert [tiny_lab.pretrain_lr(s, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [tiny_lab.pretrain_lr(s, cfg, 10, 4) for s in range(10, 14)] == [1.0, 0.75, 0.5, 0.25]


def test_select_takes_the_best_validation_score_then_the_fewest_steps_then_the_smaller_lr():
    C = lambda lr, step, right: tiny_lab.Candidate("sft", lr, step, f"{lr}-{step}", right, 64)
    assert tiny_lab.select([C(1e-3, 4, 5), C(2e-4, 8, 9), C(5e-5, 8, 7)]) == C(2e-4, 8, 9)
    assert tiny_lab.select([C(1e-3, 8, 9), C(1e-3, 4, 9), C(5e-5, 8, 9)]) == C(1e-3, 4, 9)
    assert tiny_lab.select([C(1e-3, 4, 0), C(5e-5, 4, 0), C(2e-4, 4, 0)]) == C(5e-5, 4, 0)


def naive_bootstrap(a, b, samples, seed):
    """paired_bootstrap's resampling with plain loops over the same random draws."""
    generator = torch.Generator().manual_seed(seed)
    n_seeds, n_questions = len(a), len(a[0])
    seeds = torch.randint(n_seeds, (samples, n_seeds), generator=generator).tolist()
    questions = torch.randint(n_questions, (samples, n_seeds, n_questions), generator=generator).tolist()
    means = []
    for r in range(samples):
        total = 0
        for i in range(n_seeds):
            s = seeds[r][i]
            total += sum(a[s][q] - b[s][q] for q in questions[r][i])
        means.append(total / (n_seeds * n_questions))
    return sorted(means)


def test_paired_bootstrap_matches_a_naive_loop():
    a = [[1, 1, 0, 1, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 1]]
    b = [[0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [1, 0, 1, 0, 0]]
    interval = tiny_lab.paired_bootstrap(a, b, samples=400, level=0.9, seed=7)
    means = naive_bootstrap(a, b, samples=400, seed=7)
    # the point estimate: the mean over seeds of (right by a - right by b) / questions = (2 + 2 + 0) / 15
    assert interval.difference == pytest.approx(4 / 15)
    # torch.quantile interpolates linearly between order statistics: position q * (R - 1)
    for q, got in ((0.05, interval.low), (0.95, interval.high)):
        pos = q * (len(means) - 1)
        lo = int(pos)
        assert got == pytest.approx(means[lo] + (pos - lo) * (means[lo + 1] - means[lo]))


def test_paired_bootstrap_hand_worked_cases():
    # every question differs the same way: no resample can change the mean
    same = tiny_lab.paired_bootstrap([[1, 1, 1, 1]] * 2, [[0, 0, 0, 0]] * 2, samples=200)
    assert (same.difference, same.low, same.high) == (1.0, 1.0, 1.0)
    # pairing: a and b disagree on no question, so the interval is 0 however much a varies
    tied = tiny_lab.paired_bootstrap([[1, 0, 1, 0, 1]], [[1, 0, 1, 0, 1]], samples=200)
    assert (tied.low, tied.high) == (0.0, 0.0)
    # one seed, many questions: close to the normal approximation d +- 1.96 sd / sqrt(Q)
    d = [1] * 30 + [-1] * 10 + [0] * 160                 # 200 questions: 30 won, 10 lost
    a, b = [[max(x, 0) for x in d]], [[max(-x, 0) for x in d]]
    interval = tiny_lab.paired_bootstrap(a, b, samples=20_000)
    mean = sum(d) / len(d)
    sd = (sum((x - mean) ** 2 for x in d) / len(d)) ** 0.5
    assert interval.difference == pytest.approx(0.1)
    assert interval.low == pytest.approx(mean - 1.96 * sd / len(d) ** 0.5, abs=0.006)
    assert interval.high == pytest.approx(mean + 1.96 * sd / len(d) ** 0.5, abs=0.006)


def test_comparisons_by_hand():
    per_question = [{"EKSFT": {"accuracy": [1, 1, 1, 0], "prose_accuracy": [1, 0, 1, 0]},
                     "SFT": {"accuracy": [0, 0, 1, 0], "prose_accuracy": [1, 0, 1, 0]}}] * 2
    line = tiny_lab.comparisons(per_question, [("EKSFT", "SFT")], 4)
    # accuracy: +2 of 4 on each seed; a resample of 8 draws is all-zero differences with chance
    # (1/2)^8 < 2.5%, so the 95% interval stays above 0. Prose: identical answers, 0 exactly
    assert line.startswith("- EKSFT minus SFT: held-out acc +50.0 points (per seed +2, +2 of 4; 95% interval ")
    assert "excludes 0); skill in prose +0.0 points (per seed +0, +0 of 4; 95% interval +0.0 to +0.0, " \
           "includes 0)" in line


def test_comparison_pairs_and_rl_changes():
    assert tiny_lab.comparison_pairs(["SFT", "EKSFT"], with_rl=False) == [("EKSFT", "SFT")]
    assert tiny_lab.comparison_pairs(["SFT", "DFT", "EKSFT"], with_rl=True) == [
        ("DFT", "SFT"), ("EKSFT", "SFT"), ("EKSFT", "DFT"), ("DFT+RL", "SFT+RL"), ("EKSFT+RL", "SFT+RL"),
        ("EKSFT+RL", "DFT+RL"), ("SFT+RL", "SFT"), ("DFT+RL", "DFT"), ("EKSFT+RL", "EKSFT")]
    per_question = [{"SFT": {"accuracy": [1, 1, 0]}, "SFT+RL": {"accuracy": [1, 0, 0]},
                     "EKSFT": {"accuracy": [0, 1, 0]}, "EKSFT+RL": {"accuracy": [1, 0, 0]}}]
    assert tiny_lab.rl_changes(per_question, ["SFT", "EKSFT"]) == [
        {"seed": 0, "method": "SFT", "before": 2, "after": 1, "fell": True},
        {"seed": 0, "method": "EKSFT", "before": 1, "after": 1, "fell": False}]


def test_a_method_eksft_py_lacks_is_skipped_with_a_warning(monkeypatch):
    real = tiny_lab.eksft.parse_args

    def without_dft(argv):
        if "dft" in argv:
            raise tiny_lab.data.UserError("argument --method: invalid choice: 'dft'")
        return real(argv)

    monkeypatch.setattr(tiny_lab.eksft, "parse_args", without_dft)
    said = []
    assert tiny_lab.offered_methods(log=said.append) == ["sft", "eksft"]
    assert said == ["warning: eksft.py has no --method dft; the lab runs without DFT"]


def test_plan_seconds_shares_the_cores():
    cfg = tiny_lab.settings_for(tiny_lab.parse_args(["--regime", "paper"]))
    stages, one = tiny_lab.plan_seconds(cfg, 1, 1, 1, ["sft", "eksft"], cores=2)
    per_seed = sum(stages.values())
    assert one == pytest.approx(per_seed)
    assert tiny_lab.plan_seconds(cfg, 3, 1, 1, ["sft", "eksft"], cores=2)[1] == pytest.approx(3 * per_seed)
    assert tiny_lab.plan_seconds(cfg, 3, 3, 1, ["sft", "eksft"], cores=2)[1] == pytest.approx(1.5 * per_seed)
    assert tiny_lab.plan_seconds(cfg, 2, 2, 1, ["sft", "eksft"], cores=2)[1] == pytest.approx(per_seed)
    # the RL stage by hand: 2 methods x 20 steps x 16 prompts x 8 completions x 260 token slots
    assert stages["RL"] == pytest.approx(2 * 20 * 16 * 8 * 260 * tiny_lab.COST["rl_token"])


def test_every_lab_command_in_the_lesson_parses(tmp_path, monkeypatch):
    """Each `python tutorial/tiny_lab.py ...` in tutorial/README.md is accepted by this version's
    parser, except the old lab's block, which says it runs at commit a4ca328."""
    with open(os.path.join(ROOT, "tutorial", "README.md")) as f:
        text = re.sub(r"```bash\ngit checkout a4ca328.*?```", "", f.read(), flags=re.S)
    commands = re.findall(r"python tutorial/tiny_lab\.py([^`\n#]*)", text)
    assert len(commands) >= 8 and not any("--ablations" in c for c in commands)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = shlex.split(command)
        if "--bases" in argv:   # an earlier command's output directory
            os.makedirs(argv[argv.index("--bases") + 1], exist_ok=True)
        tiny_lab.parse_args(argv)


def test_checked_solution_checks_each_step():
    problem = {"question": "Ava has 5 apples. Then Ava doubles the apples. Then Ava gives away 3. "
                           "Then Ava buys 4 more. How many apples does Ava have now?",
               "solution": "Ava starts with 5 apples. After doubling: 5 * 2 = 10. After giving away 3: "
                           "10 - 3 = 7. After buying 4: 7 + 4 = 11. The answer is \\boxed{11}.", "answer": "11"}
    assert tiny_lab.checked_solution(problem) == (
        "Ava starts with 5 apples. After doubling: 5 * 2 = 10. Check: 10 / 2 = 5. After giving away 3: "
        "10 - 3 = 7. Check: 7 + 3 = 10. After buying 4: 7 + 4 = 11. Check: 11 - 4 = 7. "
        "So Ava has 11 apples now. The answer is \\boxed{11}.")


@pytest.mark.parametrize("regime,quick", [("lesson", False), ("lesson", True), ("paper", True)])
def test_lab_held_out_shares_no_question_with_its_training_sets(tmp_path, regime, quick):
    """At the lab's sizes and for 3 seeds: no held-out question is in the pre-training corpus, an
    SFT set or an RL set (the paper regime's full size: the test above). The lesson's held-out
    questions are data.py's first ones, the ones its published numbers used."""
    cfg = tiny_lab.settings_for(tiny_lab.parse_args(["--regime", regime] + ["--quick"] * quick))
    held_out = tiny_lab.held_out_problems(cfg, regime)
    if regime == "lesson":
        assert held_out == tiny_lab.data.synthetic_problems(cfg["eval_questions"], seed=10_000)
    questions = {p["question"] for p in held_out}
    assert len(questions) == cfg["eval_questions"]
    assert not questions & {p["question"] for p in tiny_lab.pretraining_problems(cfg)}
    validation = tiny_lab.validation_problems(cfg, regime, held_out)
    for seed in range(3):
        paths = tiny_lab.write_data(cfg, regime, seed, held_out + validation,
                                    str(tmp_path / str(seed)))
        sft = {json.loads(line)["problem"] for line in open(paths["sft"])}
        rl_questions = {json.loads(line)["question"] for line in open(paths["rl"])}
        assert len(sft) == cfg["sft_examples"] and not questions & (sft | rl_questions)


def test_paper_regime_held_out_is_harder_than_every_sft_example(tmp_path):
    cfg = tiny_lab.settings_for(tiny_lab.parse_args(["--regime", "paper"]))
    held_out = tiny_lab.held_out_problems(cfg, "paper")
    assert len(held_out) == cfg["eval_questions"] and cfg["format_docs"] == 0.05
    corpus = {p["question"] for p in tiny_lab.data.synthetic_problems(cfg["pretrain_problems"],
                                                                      seed=tiny_lab.PRETRAIN_SEED)}
    validation = tiny_lab.validation_problems(cfg, "paper", held_out)
    assert len(validation) == cfg["val_questions"]
    paths = tiny_lab.write_data(cfg, "paper", 0, held_out + validation, str(tmp_path))
    sft = [json.loads(line) for line in open(paths["sft"])]
    rl_questions = {json.loads(line)["question"] for line in open(paths["rl"])}
    assert len(sft) == cfg["sft_examples"] and len(rl_questions) > 1900
    assert {row["problem"].count(" Then ") for row in sft} == {2, 3}   # both lengths: no step count to memorise
    assert not rl_questions & {row["problem"] for row in sft}
    sft_questions = {row["problem"] for row in sft}
    held_out_questions = {p["question"] for p in held_out}
    for p in held_out + validation:   # both harder than every SFT example, in no other set
        assert p["question"].count(" Then ") == 3 and int(p["answer"]) > 40
        assert p["question"] not in corpus and p["question"] not in rl_questions
        assert p["question"] not in sft_questions
    assert not held_out_questions & {p["question"] for p in validation}
    for row in sft:
        steps = row["problem"].count(" Then ")
        assert steps in (2, 3) and row["solution"].count("Check: ") == steps
        assert max(int(x) for x in re.findall(r"\d+", row["solution"])) <= 40


def test_token_kinds_by_hand():
    kinds = tiny_lab.token_kinds("Step 1: 12 + 3 = 15. The answer is \\boxed{15}.")
    by_char = dict(enumerate(kinds))
    text = "Step 1: 12 + 3 = 15. The answer is \\boxed{15}."
    assert [kinds[i] for i in range(len(text)) if text[i].isdigit()][:4] == ["other digits"] * 4  # 1, 1 2, 3
    assert kinds[text.index("15")] == kinds[text.index("15") + 1] == "result digits"
    assert set(kinds[text.index("The"):]) == {"answer line"}
    assert by_char[0] == "words"


def test_entropy_threshold_inf_leaves_only_the_kl_selection():
    """The K-only ablation: eksft_loss with entropy_threshold=inf selects nothing by entropy and
    the same tokens by KL as the full loss, the top floor(ratio * n) KL tokens above the threshold."""
    torch.manual_seed(0)
    logits, ref = torch.randn(2, 12, 7), torch.randn(2, 12, 7)
    labels = torch.randint(0, 7, (2, 12))
    labels[:, :3] = -100
    _, full = tiny_lab.eksft.eksft_loss(logits, labels, ref, ratio=0.3, return_masks=True)
    _, k_only = tiny_lab.eksft.eksft_loss(logits, labels, ref, ratio=0.3, entropy_threshold=float("inf"),
                                          return_masks=True)
    assert not k_only["by_entropy"].any() and full["by_entropy"].any()
    assert torch.equal(k_only["by_kl"], full["by_kl"])
    kl = full["token_kl"]
    for b in range(2):
        n = int((labels[b, 1:] != -100).sum())                     # 9 response targets: k = 2
        top = kl[b].masked_fill(labels[b, 1:] == -100, -1).argsort(descending=True)[: int(0.3 * n)]
        assert sorted(k_only["by_kl"][b].nonzero().flatten().tolist()) == sorted(top.tolist())
