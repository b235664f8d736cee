"""tutorial/tiny_lab.py: the --quick pipeline end to end (as CI runs it), its files, and the plots."""
import json
import os
import re
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
PLACEHOLDER = re.compile(r"\b[A-Z0-9]+_BLOCK\b|\bTODO\b|\bTBD\b|\bXXX\b|\bFIXME\b|<fill[^>]*>|\{\{[^}]*\}\}", re.I)


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
    assert report["rows"] == ["base", "SFT", "EKSFT", "SFT+RL", "EKSFT+RL"]
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
    base = report["summary"]["base"]
    assert abs(base["kl_prose"]["mean"]) < 1e-5 and abs(base["kl_chat"]["mean"]) < 1e-5  # KL(base||base)

    table = (out / "results.md").read_text()
    lines = [l for l in table.split("\n\n")[2].splitlines() if l.startswith("|")]   # the main table
    assert len(lines) == 2 + 5 and all(l.count("|") == lines[0].count("|") for l in lines)
    for name in report["rows"]:
        assert any(l.startswith(f"| {name} |") for l in lines)
    command = f"python tutorial/tiny_lab.py --quick --output-dir {out}"
    assert report["command"] == command and table.startswith(f"`{command}`")   # every flag
    import transformers
    assert f"1 torch thread(s), torch {torch.__version__}, transformers {transformers.__version__}" in table
    assert report["machine"]["torch_threads"] == 1
    assert table.split("\n\n")[2].strip() in stdout  # the printed table is the saved one


def test_quick_run_without_matplotlib_says_so(quick_run):
    out, stdout, _ = quick_run
    assert "matplotlib is not installed" in stdout
    assert not list(out.glob("*.png"))
    curves = json.loads((out / "curves.json").read_text())
    assert curves["pretrain"] and set(curves["per_seed"]["0"]) == {"SFT", "EKSFT", "SFT+RL", "EKSFT+RL"}


def test_quick_run_shows_the_mask(quick_run):
    _, stdout, _ = quick_run
    assert "legend: <<prompt>> trained [E:masked by entropy]" in stdout
    assert "[E:" in stdout  # at least one token dropped for its entropy


def test_plots_are_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    per_seed = [{name: {"accuracy": 0.1 * i + s, "prose_accuracy": 0.5 - 0.1 * i, "kl_prose": 0.01 * i, "kl_chat": 0.02 * i}
                 for i, name in enumerate(tiny_lab.MAIN_ROWS)} for s in (0.0, 0.05)]
    summary = tiny_lab.summarise(per_seed)
    curves = {"SFT": [{"step": 1, "kl": 0.0, "ce": 2.0}, {"step": 2, "kl": 0.1, "ce": 1.5}],
              "EKSFT": [{"step": 1, "kl": 0.0, "ce": 2.1, "masked_frac": 0.2},
                        {"step": 2, "kl": 0.05, "ce": 1.7, "masked_frac": 0.35}],
              "SFT+RL": [{"step": 1, "reward": 0.1}], "EKSFT+RL": [{"step": 1, "reward": 0.2}]}
    paths = tiny_lab.save_plots(summary, curves, str(tmp_path))
    assert len(paths) == 2
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_summary_mean_and_spread():
    per_seed = [{name: {"accuracy": v} for name in tiny_lab.MAIN_ROWS} for v in (0.2, 0.4, 0.6)]
    stat = tiny_lab.summarise(per_seed)["SFT"]["accuracy"]
    assert stat["mean"] == pytest.approx(0.4) and stat["std"] == pytest.approx(0.2)
    assert stat["values"] == [0.2, 0.4, 0.6]


def test_prose_has_the_skill_but_not_the_format():
    problem = tiny_lab.data.synthetic_problems(1, seed=3)[0]
    text = tiny_lab.prose(problem)
    assert text.startswith(problem["question"])
    assert re.search(rf"So \w+ has {problem['answer']} \w+ now\.$", text)
    assert "\\boxed" not in text and "answer" not in text.lower()
    assert tiny_lab.rl.extract_answer(text) is None  # the checker finds no answer in pre-training text


def test_rerun_gives_the_same_numbers(quick_run):
    """Stages 2-4 again on the first run's base, with OMP_NUM_THREADS=2 in the environment (the lab
    sets its own thread count): every measured number must be identical, not merely close."""
    out, _, _ = quick_run
    again = out.parent / (out.name + "-again")
    run_lab(["--quick", "--base", str(out / "base"), "--output-dir", str(again)], env_threads="2")
    first = json.loads((out / "results.json").read_text())
    second = json.loads((again / "results.json").read_text())
    assert second["per_seed"] == first["per_seed"]
    assert second["mask_by_kind"] == first["mask_by_kind"]


def test_pretraining_is_reproducible():
    """The stage a rerun with --base skips: two short pre-trainings give identical weights."""
    cfg = dict(tiny_lab.QUICK, pretrain_problems=200, pretrain_steps=3, block_size=64, hidden_size=32,
               num_layers=1)
    tokenizer = tiny_lab.eksft.char_tokenizer()
    weights = []
    for _ in range(2):
        model, curve = tiny_lab.pretrain(cfg, tokenizer, torch.device("cpu"), log=lambda *_: None)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert len(curve) == 3


def test_docs_have_no_placeholder():
    for path in ("README.md", os.path.join("tutorial", "README.md")):
        with open(os.path.join(ROOT, path)) as f:
            found = PLACEHOLDER.findall(f.read())
        assert not found, f"{path}: unfilled placeholder(s) {found}"
    assert PLACEHOLDER.search("see FINAL2_BLOCK") and PLACEHOLDER.search("TODO: x")  # the pattern works


def test_checked_solution_checks_each_step():
    problem = {"question": "Ava has 5 apples. Then Ava doubles the apples. Then Ava gives away 3. "
                           "Then Ava buys 4 more. How many apples does Ava have now?",
               "solution": "Ava starts with 5 apples. After doubling: 5 * 2 = 10. After giving away 3: "
                           "10 - 3 = 7. After buying 4: 7 + 4 = 11. The answer is \\boxed{11}.", "answer": "11"}
    assert tiny_lab.checked_solution(problem) == (
        "Ava starts with 5 apples. After doubling: 5 * 2 = 10. Check: 10 / 2 = 5. After giving away 3: "
        "10 - 3 = 7. Check: 7 + 3 = 10. After buying 4: 7 + 4 = 11. Check: 11 - 4 = 7. "
        "So Ava has 11 apples now. The answer is \\boxed{11}.")


def test_paper_regime_held_out_is_harder_than_every_sft_example(tmp_path):
    cfg = tiny_lab.settings_for(tiny_lab.parse_args(["--regime", "paper"]))
    held_out = tiny_lab.held_out_problems(cfg, "paper")
    assert len(held_out) == cfg["eval_questions"] and cfg["format_docs"] == 0.05
    corpus = {p["question"] for p in tiny_lab.data.synthetic_problems(cfg["pretrain_problems"],
                                                                      seed=tiny_lab.PRETRAIN_SEED)}
    paths = tiny_lab.write_data(cfg, "paper", 0, held_out, str(tmp_path))
    sft = [json.loads(line) for line in open(paths["sft"])]
    rl_questions = {json.loads(line)["question"] for line in open(paths["rl"])}
    assert len(sft) == cfg["sft_examples"] and len(rl_questions) > 1900
    assert {row["problem"].count(" Then ") for row in sft} == {2, 3}   # both lengths: no step count to memorise
    assert not rl_questions & {row["problem"] for row in sft}
    for p in held_out:
        assert p["question"].count(" Then ") == 3 and int(p["answer"]) > 40
        assert p["question"] not in corpus and p["question"] not in rl_questions
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


def test_comparisons_mark_differences_beyond_the_spread():
    per_seed = [{"SFT": {k: v for k in ("accuracy", "no_answer", "prose_accuracy", "pass@1", "pass@8")},
                 "EKSFT": {k: v + d for k in ("accuracy", "no_answer", "prose_accuracy", "pass@1", "pass@8")},
                 "SFT+RL": {k: 0.5 for k in ("accuracy", "no_answer", "prose_accuracy", "pass@1", "pass@8")},
                 "EKSFT+RL": {k: 0.5 for k in ("accuracy", "no_answer", "prose_accuracy", "pass@1", "pass@8")}}
                for v, d in ((0.40, 0.20), (0.42, 0.20), (0.44, 0.20))]
    summary = tiny_lab.summarise(per_seed)
    for name in summary:
        summary[name]["pass@k"] = summary[name]["pass@8"]
    lines = tiny_lab.comparisons(summary, 8, 3).splitlines()
    # EKSFT - SFT = +20 points, each std 2 points: beyond; SFT+RL - SFT = +8 points, stds 2 and 0: beyond
    assert lines[0].startswith("- EKSFT minus SFT: held-out acc (greedy) +20.0 (beyond the spread)")
    assert "(within" not in lines[0]
    assert lines[1].startswith("- EKSFT+RL minus SFT+RL: held-out acc (greedy) +0.0 (within the spread)")


def test_no_rl_rows_without_rl():
    """--rl-steps 0: the settings say so, and the comparisons leave out the pairs with +RL rows."""
    cfg = tiny_lab.settings_for(tiny_lab.parse_args(["--rl-steps", "0"]))
    assert cfg["rl_steps"] == 0 and tiny_lab.settings_for(tiny_lab.parse_args([]))["rl_steps"] > 0
    keys = ("accuracy", "no_answer", "prose_accuracy", "pass@1", "pass@8", "pass@k")
    summary = tiny_lab.summarise([{name: {k: 0.5 for k in keys} for name in ("base", "SFT", "EKSFT")}])
    assert tiny_lab.comparisons(summary, 8, 1).splitlines() == [
        "- EKSFT minus SFT: held-out acc (greedy) +0.0, no answer +0.0, skill in prose +0.0, pass@1 +0.0, "
        "pass@8 +0.0"]
