"""Bad input and faults: each gives one `error:` line naming the file, row or flag, a non-zero exit
and no lost work. Table-driven and in-process (through each script's own entry point and
data.run_cli), so it stays fast; a few subprocess runs check the scripts' __main__ wiring."""
import importlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import data
import eksft
import evaluate
import rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--num-samples", "8", "--batch-size", "4", "--micro-batch-size", "4", "--max-len", "400",
         "--log-every", "100"]   # a tiny eksft.py run: 2 steps per epoch, a second or two per step
RL_SMALL = ["--max-new-tokens", "8", "--group-size", "2", "--prompts-per-step", "2", "--eval-size", "0",
            "--print-every", "0", "--log-every", "100"]


def cli_error(capsys, main):
    """Run main() as the scripts do (data.run_cli); return (exit code, what it wrote to stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        data.run_cli(main)
    return e.value.code, capsys.readouterr().err


ENTRY = {"eksft": lambda argv: eksft.train(eksft.parse_args(argv)),
         "rl": lambda argv: rl.train(rl.parse_args(argv)),
         "evaluate": evaluate.main, "data": data.main}


@pytest.fixture
def files(tmp_path):
    """Bad inputs on disk: name -> path."""
    f = {"dir": tmp_path / "a_dir", "file": tmp_path / "a_file", "empty": tmp_path / "empty.jsonl",
         "binary": tmp_path / "binary.jsonl", "latin1": tmp_path / "latin1.jsonl",
         "csv": tmp_path / "rows.csv", "parquet": tmp_path / "broken.parquet",
         "assistant_first": tmp_path / "assistant_first.jsonl", "long": tmp_path / "long.jsonl",
         "empty_json": tmp_path / "empty.json"}
    f["dir"].mkdir()
    f["file"].write_text("not a directory\n")
    f["empty"].write_bytes(b"")
    f["empty_json"].write_text("[]")
    f["binary"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    good = '{"question": "1+1?", "answer": "2"}\n'
    f["latin1"].write_bytes(good.encode() + '{"question": "café?", "answer": "3"}\n'.encode("latin-1"))
    f["csv"].write_text("question,answer\n1+1?,2\n")
    f["parquet"].write_text("this is not parquet")
    f["assistant_first"].write_text(good + json.dumps({"messages": [
        {"role": "system", "content": "S"}, {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q"}]}) + "\n")
    f["long"].write_text(json.dumps({"problem": "q", "solution": "x" * 500}) + "\n")
    f["no_columns"] = tmp_path / "no_columns.jsonl"    # a QA row with neither column
    f["no_columns"].write_text(good + json.dumps({"text": "q", "gold": "2"}) + "\n")
    f["lines_json"] = tmp_path / "lines.json"          # JSON Lines under .json, row 2 cut short
    f["lines_json"].write_text(good + good[:-3] + "\n")
    return {k: str(v) for k, v in f.items()}


CASES = [  # (script, argv, fragment of the one error line); FILE names come from the fixture
    # data files
    ("eksft", ["--data", "{dir}"], "a_dir: is a directory; give a .jsonl/.json/.parquet file"),
    ("eksft", ["--data", "{binary}"], "binary.jsonl, row 1: not UTF-8 text (byte 0x89)"),
    ("eksft", ["--data", "{latin1}"], "latin1.jsonl, row 2: not UTF-8 text (byte 0xe9)"),
    ("eksft", ["--data", "{empty}"], "empty.jsonl: no rows (the file is empty)"),
    ("eksft", ["--data", "{empty_json}"], "empty.json: no rows (the file is empty)"),
    ("eksft", ["--data", "{csv}"], "rows.csv: unknown file type '.csv' (use .jsonl, .json or .parquet)"),
    ("eksft", ["--data", "{parquet}"], "broken.parquet: not a readable parquet file"),
    ("eksft", ["--data", "{dir}/missing.jsonl"], "missing.jsonl: no such file"),
    ("eksft", ["--data", "{assistant_first}"], "assistant_first.jsonl, row 2: turn 2 is the assistant's, "
                                               "but the first turn after the system prompt must be the user's"),
    ("eksft", ["--data", "{long}", "--max-len", "64"],
     "long.jsonl: none of its 1 examples fits --max-len 64 (the shortest has"),
    ("eksft", ["--data", "gsm9k"], "unknown data set 'gsm9k': not one of the aliases openr1-3k, gsm8k"),
    ("data", ["--data", "gsm9k"], "unknown data set 'gsm9k'"),
    ("rl", ["--data", "gsm9k"], "unknown question/answer set 'gsm9k'"),
    ("rl", ["--data", "{dir}"], "a_dir: is a directory"),
    ("rl", ["--data", "{latin1}"], "latin1.jsonl, row 2: not UTF-8 text"),
    ("evaluate", ["--benchmarks", "gsm9k"], "unknown question/answer set 'gsm9k'"),
    ("evaluate", ["--benchmarks", "{csv}"], "rows.csv: unknown file type '.csv'"),
    ("evaluate", ["--benchmarks", "{empty}"], "empty.jsonl: no rows (the file is empty)"),
    ("rl", ["--data", "{no_columns}"], "no_columns.jsonl, row 2: missing fields 'question' (or "
                                       "'problem') and 'answer'; it has ['gold', 'text']"),
    ("evaluate", ["--benchmarks", "{no_columns}"], "no_columns.jsonl, row 2: missing fields"),
    ("eksft", ["--data", "{lines_json}"], "lines.json, row 2: not valid JSON"),
    ("evaluate", ["--benchmarks", "{lines_json}"], "lines.json, row 2: not valid JSON"),
    # model names: refused before any hub call
    ("eksft", ["--model", "Qwen2.5-0.6B"], "'Qwen2.5-0.6B' is not a known short name (Qwen2.5-0.5B,"),
    ("eksft", ["--model", "{dir}/no-such-run"], "no-such-run: no such model directory"),
    ("eksft", ["--ref-model", "Qwen2.5-0.6B"], "'Qwen2.5-0.6B' is not a known short name"),
    ("rl", ["--model", "Qwen2.5-0.6B"], "'Qwen2.5-0.6B' is not a known short name"),
    ("evaluate", ["--model", "Qwen2.5-0.6B", "--benchmarks", "synthetic"], "not a known short name"),
    # the output directory, checked before the model is loaded
    ("eksft", ["--output-dir", "{file}"], "--output-dir {file}: exists and is not a directory"),
    ("eksft", ["--output-dir", "{file}/sub"], "--output-dir {file}/sub: {file} is a file, not a directory"),
    ("eksft", ["--model", "{dir}"], "a_dir: no config.json, so no model in this directory"),
    ("eksft", ["--output-dir", "/sys/eksft-test"], "--output-dir /sys/eksft-test: cannot write there"),
    ("rl", ["--output-dir", "{file}"], "exists and is not a directory"),
    ("evaluate", ["--output-dir", "{file}"], "exists and is not a directory"),
    # the device
    ("eksft", ["--device", "gpu"], "--device gpu: not a device (use auto, cpu, cuda, cuda:N or mps)"),
    # numbers out of range (silently accepted, or a traceback, before)
    ("eksft", ["--ratio", "1.5"], "--ratio 1.5: must be between 0 and 1"),
    ("eksft", ["--ratio", "-0.1"], "--ratio -0.1: must be between 0 and 1"),
    ("eksft", ["--lr", "0"], "--lr 0.0: must be positive"),
    ("eksft", ["--lr=-1e-5"], "--lr -1e-05: must be positive"),
    ("eksft", ["--epochs", "0"], "--epochs 0: must be at least 1"),
    ("eksft", ["--num-samples", "0"], "--num-samples 0: must be at least 1"),
    ("eksft", ["--micro-batch-size", "0"], "--micro-batch-size 0: must be at least 1"),
    ("eksft", ["--batch-size", "6", "--micro-batch-size", "4"], "--batch-size 6 is not a multiple"),
    ("eksft", ["--warmup", "2"], "--warmup 2.0: must be between 0 and 1"),
    ("eksft", ["--grad-clip", "0"], "--grad-clip 0.0: must be positive"),
    ("eksft", ["--method", "sft", "--ref-model", "tiny"], "--ref-model tiny: must be used with --method eksft"),
    ("rl", ["--micro-batch-size", "0"], "--micro-batch-size 0: must be at least 1"),
    ("rl", ["--lr", "0"], "--lr 0.0: must be positive"),
    ("rl", ["--group-size", "1"], "--group-size 1: must be at least 2"),
    ("rl", ["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    ("rl", ["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    ("evaluate", ["--limit", "0"], "--limit 0: must be at least 1 (leave it out for all)"),
    ("evaluate", ["--samples", "0"], "--samples 0: must be at least 1"),
    ("evaluate", ["--samples", "4"], "--samples > 1 needs --temperature > 0"),
    ("data", ["--num-samples", "0"], "--num-samples 0: must be at least 1"),
    # argparse's own errors: one line too, not the usage text
    ("eksft", ["--lr", "abc"], "argument --lr: invalid float value: 'abc' (see --help)"),
    ("rl", ["--no-such-flag"], "unrecognized arguments: --no-such-flag (see --help)"),
    ("evaluate", ["--checker", "sympy"], "argument --checker: invalid choice: 'sympy'"),
]


@pytest.mark.parametrize("script,argv,fragment", CASES,
                         ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_error_line(tmp_path, files, capsys, monkeypatch, script, argv, fragment):
    monkeypatch.chdir(tmp_path)    # default output directories land here
    fill = lambda s: s.format(**files)
    argv = [fill(a) for a in argv]
    if script in ("eksft", "rl", "evaluate") and not any(a == "--output-dir" for a in argv):
        argv += ["--output-dir", str(tmp_path / "out")]
    code, err = cli_error(capsys, lambda: ENTRY[script](argv))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert fill(fragment) in err, err


def test_unknown_names_never_reach_the_hub(tmp_path, monkeypatch):
    """A mistyped short name or alias is refused at once: the hub functions are never called."""
    import datasets
    import transformers

    def hub(*args, **kwargs):
        raise AssertionError("the hub was called")
    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", hub)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", hub)
    with pytest.raises(data.UserError, match="unknown data set 'gsm9k'"):
        data.load_conversations("gsm9k")
    with pytest.raises(data.UserError, match="not a known short name"):
        eksft.load_model_and_tokenizer("Qwen2.5-0.6B", torch.device("cpu"))
    with pytest.raises(data.DataError, match="the hub was called"):   # owner/name: a hub id
        data.load_conversations("someone/some-dataset")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script", ["eksft", "rl", "evaluate"])
def test_cuda_without_cuda(tmp_path, capsys, script):
    argv = ["--device", "cuda", "--output-dir", str(tmp_path / "out")]
    argv += ["--limit", "1"] if script == "evaluate" else []
    code, err = cli_error(capsys, lambda: ENTRY[script](argv))
    assert code == 2 and err.startswith("error: --device cuda: CUDA is not available"), err


@pytest.mark.parametrize("script", ["eksft.py", "rl.py", "evaluate.py", "data.py"])
def test_scripts_print_one_line_and_exit_2(tmp_path, script):
    proc = subprocess.run([sys.executable, script, "--seed", "x"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == "error: argument --seed: invalid int value: 'x' (see --help)\n"


def script_main(folder, module, function):
    """A script's argument parser, imported from its folder (the tutorial and the benchmarks are
    scripts, not modules of the package)."""
    sys.path.insert(0, os.path.join(ROOT, folder))
    try:
        return getattr(importlib.import_module(module), function)
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize("script", [".:eksft:parse_args", ".:rl:parse_args", ".:evaluate:parse_args",
                                    ".:data:main", "tutorial:tiny_lab:parse_args",
                                    "tests/benchmarks:bench_step:main", "tests/benchmarks:bench_rollout:main",
                                    "tests/benchmarks:bench_update:main"])
def test_help_prints_each_default_once(capsys, script):
    parse = script_main(*script.split(":"))
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for option in options:
        assert len(re.findall(r"\(default\b", option)) <= 1, option


# -----------------------------------------------------------------------------
# --resume: other settings are refused by name; some may change


def train_tiny(tmp_path, *extra):
    return eksft.train(eksft.parse_args(SMALL + ["--output-dir", str(tmp_path / "run"), *extra]))[0]


def test_resume_with_other_settings_is_refused_by_name(tmp_path, capsys):
    train_tiny(tmp_path, "--max-steps", "1")
    code, err = cli_error(capsys, lambda: train_tiny(tmp_path, "--max-steps", "1", "--resume",
                                                     "--lr", "1e-3", "--ratio", "0.3"))
    assert code == 2
    assert err.startswith(f"error: --resume: {tmp_path / 'run' / 'checkpoint-1'} was run with other "
                          f"settings: --ratio 0.2 (now 0.3), --lr 0.003 (now 0.001); give the same "
                          f"ones, or add --allow-changed-args"), err
    # what does not change the computation may change: micro-batch size, device, logging, saving
    train_tiny(tmp_path, "--max-steps", "1", "--resume", "--micro-batch-size", "2", "--device", "cpu",
               "--log-every", "1", "--save-every", "0")
    # and with --allow-changed-args the new settings win
    train_tiny(tmp_path, "--max-steps", "2", "--resume", "--lr", "1e-3", "--allow-changed-args")
    assert json.load(open(tmp_path / "run" / "checkpoint-2" / "args.json"))["lr"] == 1e-3


def test_rl_resume_refuses_other_settings_but_may_run_longer(tmp_path, capsys):
    argv = RL_SMALL + ["--output-dir", str(tmp_path / "run")]
    rl.train(rl.parse_args(argv + ["--max-steps", "1"]))
    code, err = cli_error(capsys, lambda: rl.train(rl.parse_args(argv + ["--max-steps", "2", "--resume",
                                                                         "--temperature", "0.7"])))
    assert code == 2 and "--temperature 1.0 (now 0.7)" in err, err
    history = rl.train(rl.parse_args(argv + ["--max-steps", "2", "--resume"]))[2]
    assert [h["step"] for h in history] == [2]


# -----------------------------------------------------------------------------
# Ctrl-C: the step in progress ends, a checkpoint is written, --resume gives the uninterrupted result


def ctrl_c_during_step(monkeypatch, module, name, at_call):
    """Wrap module.name so that a real SIGINT arrives during its at_call-th call."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)


def test_ctrl_c_saves_a_checkpoint_and_resume_gives_the_same_model(tmp_path, capsys, monkeypatch):
    straight = train_tiny(tmp_path / "a", "--max-steps", "3", "--save-every", "0")
    ctrl_c_during_step(monkeypatch, eksft, "train_step", at_call=2)
    handler = signal.getsignal(signal.SIGINT)
    code, err = cli_error(capsys, lambda: train_tiny(tmp_path / "b", "--max-steps", "3",
                                                     "--save-every", "0"))
    checkpoint = tmp_path / "b" / "run" / "checkpoint-2"
    assert code == 130
    assert err.splitlines()[-1] == (f"interrupted at step 2; checkpoint saved to {checkpoint}; "
                                    f"continue with --resume")
    assert signal.getsignal(signal.SIGINT) is handler   # Ctrl-C behaves as before outside the loop
    monkeypatch.undo()
    resumed = train_tiny(tmp_path / "b", "--max-steps", "3", "--save-every", "0", "--resume")
    for (n, p), q in zip(resumed.named_parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3]


def test_rl_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, capsys, monkeypatch):
    argv = RL_SMALL + ["--max-steps", "3", "--save-every", "0"]
    straight = rl.train(rl.parse_args(argv + ["--output-dir", str(tmp_path / "a")]))[2]
    ctrl_c_during_step(monkeypatch, rl, "generate_completions", at_call=1)
    code, err = cli_error(capsys, lambda: rl.train(rl.parse_args(argv + ["--output-dir", str(tmp_path / "b")])))
    assert code == 130 and "interrupted at step 1; checkpoint saved to" in err, err
    monkeypatch.undo()
    resumed = rl.train(rl.parse_args(argv + ["--output-dir", str(tmp_path / "b"), "--resume"]))[2]
    assert [h["step"] for h in resumed] == [2, 3]
    for got, want in zip(resumed, straight[1:]):
        for key in ("reward", "response_length", "loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key


# -----------------------------------------------------------------------------
# a full disk: one line, and the earlier checkpoint stays


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def disk_full_on_second_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:   # what torch says when the disk fills while it writes
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1472 vs 1360")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    code, err = cli_error(capsys, lambda: train_tiny(tmp_path, "--max-steps", "2", "--save-every", "1"))
    run = tmp_path / "run"
    assert code == 2
    assert err.splitlines()[-1] == (f"error: could not write {run / 'checkpoint-2'} (RuntimeError: [enforce fail at "
                   f"inline_container.cc:664] . unexpected pos 1472 vs 1360); the checkpoints already "
                   f"in {run} are kept, --resume continues from the newest")
    assert sorted(os.listdir(run)) == ["args.json", "checkpoint-1", "metrics.jsonl"]   # no temporary left
    assert eksft.latest_checkpoint(str(run)).endswith("checkpoint-1")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_while_appending_metrics_or_samples():
    with pytest.raises(data.UserError, match=r"could not write /dev/full \(No space left on device\)"):
        eksft.append_jsonl("/dev/full", {"step": 1})


# -----------------------------------------------------------------------------
# directories written from --model tiny work offline as --model, with the tiny defaults


def test_directories_trained_from_tiny_keep_the_tiny_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_tiny(tmp_path, "--max-steps", "2", "--save-every", "0", "--lr", "3e-2")
    sft_dir = str(tmp_path / "run")
    assert json.load(open(os.path.join(sft_dir, "args.json")))["model_kind"] == "tiny"
    args = eksft.parse_args(["--model", sft_dir])
    assert (args.data, args.max_len, args.model_kind) == ("synthetic", 512, "tiny")
    args = evaluate.parse_args(["--model", sft_dir])
    assert (args.benchmarks, args.max_new_tokens) == ("synthetic", 256)

    # the tutorial's --show-mask command on it: no KL marks without a reference that differs
    show = ["--model", sft_dir, "--max-steps", "0", "--show-mask", "1", "--num-samples", "4",
            "--output-dir", str(tmp_path / "mask")]
    eksft.train(eksft.parse_args(show))
    out, picture = capsys.readouterr().out.split("legend:")
    assert "note: no step was trained" in out and "[K:" not in picture.split("\n", 1)[1]
    eksft.train(eksft.parse_args(show + ["--ref-model", "tiny"]))   # the model it started from
    out, picture = capsys.readouterr().out.split("legend:")
    assert "note:" not in out and "K:" in picture.split("\n", 1)[1], picture

    # rl.py's suggested next command: evaluate.py --model runs/rl-...
    rl.train(rl.parse_args(["--model", sft_dir, "--max-steps", "1", *RL_SMALL]))
    rl_dir = os.path.join("runs", "rl-run")
    assert json.load(open(os.path.join(rl_dir, "args.json")))["model_kind"] == "tiny"
    summaries = evaluate.run(evaluate.parse_args(["--model", rl_dir, "--limit", "2", "--max-new-tokens",
                                                  "8", "--no-progress"]))
    assert summaries[0]["benchmark"] == "synthetic" and summaries[0]["metrics"]["questions"] == 2


def test_old_directories_without_model_kind(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps({"model": "tiny"}))
    assert eksft.model_kind(str(tmp_path)) == "tiny"
    (tmp_path / "args.json").write_text(json.dumps({"model": "Qwen2.5-0.5B"}))
    assert eksft.model_kind(str(tmp_path)) == "hub"
    assert eksft.model_kind("Qwen2.5-0.5B") == "hub" and eksft.model_kind("tiny") == "tiny"
