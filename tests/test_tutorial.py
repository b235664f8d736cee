"""tutorial/tiny_lab.py: the --quick pipeline end to end (as CI runs it), its files, and the plots."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tutorial"))

import tiny_lab  # noqa: E402

QUICK_BUDGET_S = 300  # the issue asks for < 3 min on 2 idle cores; CI machines are slower and shared


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
                          timeout=2 * QUICK_BUDGET_S)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, seconds


def test_quick_run_writes_a_well_formed_table(quick_run):
    out, stdout, seconds = quick_run
    print(f"tiny_lab.py --quick took {seconds:.0f} s")
    assert seconds < QUICK_BUDGET_S
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
    lines = [l for l in table.splitlines() if l.startswith("|")]
    assert len(lines) == 2 + 5 and all(l.count("|") == lines[0].count("|") for l in lines)
    for name in report["rows"]:
        assert any(l.startswith(f"| {name} |") for l in lines)
    assert "tiny_lab.py --quick" in table
    assert table.split("\n\n")[1].strip() in stdout  # the printed table is the saved one


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
                 for i, name in enumerate(tiny_lab.ROWS)} for s in (0.0, 0.05)]
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
    per_seed = [{name: {"accuracy": v} for name in tiny_lab.ROWS} for v in (0.2, 0.4, 0.6)]
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
