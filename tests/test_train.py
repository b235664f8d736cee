"""The training loop of eksft.py on the tiny model: split invariance, resume, seeds, the CLI."""
import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import eksft
from data import build_sft_examples, load_conversations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
EKSFT = dict(ratio=0.2, combine="union", lambda_entropy=0.05, lambda_kl=0.05, scope="sequence",
             kl_threshold=1e-3)


def tiny_setup(n_examples=8):
    model, tok = eksft.load_model_and_tokenizer("tiny", CPU, seed=0)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    # move the policy away from the reference so that KL selection is active
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    examples = build_sft_examples(tok, load_conversations("synthetic")[:n_examples], 512,
                                  log=lambda *_: None)
    return model, ref, tok, examples


@pytest.mark.parametrize("loss_kwargs", [EKSFT, dict(ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0)],
                         ids=["eksft", "sft"])
def test_micro_batch_split_gives_the_same_gradient(loss_kwargs):
    """batch 4 x accumulation 1 and batch 1 x accumulation 4 give the same update."""
    model, ref, tok, examples = tiny_setup(4)
    grads = []
    for micro in (4, 1, 2):
        model.zero_grad()
        stats = eksft.train_step(model, ref if loss_kwargs["ratio"] else None, examples[:4], micro,
                                 tok.pad_token_id, loss_kwargs, CPU, None)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        if loss_kwargs["ratio"]:
            assert stats["masked_kl_frac"] > 0.1  # the KL selection took part
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)


def run_train(tmp_path, name, *extra):
    args = eksft.parse_args(["--model", "tiny", "--num-samples", "32", "--batch-size", "8",
                             "--micro-batch-size", "4", "--max-len", "400", "--save-every", "2",
                             "--output-dir", str(tmp_path / name), *extra])
    model, _ = eksft.train(args)
    return model


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight = {n: p.detach().clone() for n, p in
                run_train(tmp_path, "run", "--max-steps", "4").named_parameters()}
    # a crash after step 2's checkpoint: step 4's checkpoint never got written
    import shutil
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    assert eksft.latest_checkpoint(str(tmp_path / "run")).endswith("checkpoint-2")
    resumed = run_train(tmp_path, "run", "--max-steps", "4", "--resume")
    for n, p in resumed.named_parameters():
        torch.testing.assert_close(p, straight[n], rtol=0, atol=1e-6, msg=n)
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]  # no duplicated steps after resuming


def test_same_seed_same_result_and_metrics_fields(tmp_path):
    a = run_train(tmp_path, "a", "--max-steps", "2")
    b = run_train(tmp_path, "b", "--max-steps", "2")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    for key in ("loss", "ce", "entropy", "kl", "masked_frac", "masked_entropy_frac", "masked_kl_frac",
                "iou", "lr", "grad_norm", "tokens_per_s"):
        assert key in rows[-1]
    assert rows[0]["masked_kl_frac"] == 0.0  # step 1: policy == reference, nothing selected by KL
    assert rows[1]["masked_kl_frac"] > 0.0


def test_offline_cli_run_saves_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "eksft.py", "--model", "tiny", "--max-steps", "3",
                             "--output-dir", str(out), "--show-mask", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "done: 3 steps" in result.stdout
    assert "[E:" in result.stdout and "<<" in result.stdout  # the mask picture, plain-text markers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen2" and tok.eos_token == "<|im_end|>"
    assert json.load(open(out / "args.json"))["max_steps"] == 3


@pytest.mark.parametrize("argv,fragment", [
    (["--model", "no-such-org/no-such-model"], "could not load model 'no-such-org/no-such-model'"),
    (["--data", "BAD"], "row 2: turn 2 is an empty assistant turn"),
])
def test_cli_errors_are_one_clear_line(tmp_path, argv, fragment):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "q", "solution": "a"}\n{"problem": "q", "solution": ""}\n')
    argv = [str(bad) if a == "BAD" else a for a in argv]
    result = subprocess.run([sys.executable, "eksft.py", *argv, "--output-dir", str(tmp_path / "o")],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_method_dft_runs_without_a_reference_and_is_recorded(tmp_path):
    """--method dft: selection and regularisers off like sft (no reference model), each token's CE
    weighted by p(target); args.json says dft; the first step's loss is the DFT loss of the
    starting model on the first step's batch (checked against an independent sum)."""
    args = eksft.parse_args(["--model", "tiny", "--method", "dft", "--num-samples", "16",
                             "--batch-size", "8", "--micro-batch-size", "4", "--max-len", "400",
                             "--max-steps", "1", "--save-every", "0",
                             "--output-dir", str(tmp_path / "dft")])
    assert eksft.loss_options(args) == dict(ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0, dft=True)
    start, tok = eksft.load_model_and_tokenizer("tiny", CPU, seed=args.seed)
    eksft.train(args)
    assert json.load(open(tmp_path / "dft" / "args.json"))["method"] == "dft"
    row = json.loads(open(tmp_path / "dft" / "metrics.jsonl").readline())
    assert row["masked_frac"] == 0.0 and row["kl"] is None     # no reference: KL is not computed
    from data import collate, step_batches
    examples = build_sft_examples(tok, load_conversations(args.data, seed=args.seed), args.max_len,
                                  args.num_samples, log=lambda *_: None)
    plan = step_batches([len(e["input_ids"]) for e in examples], args.batch_size, args.seed)
    batch = collate([examples[i] for i in plan[0]], tok.pad_token_id)
    with torch.no_grad():
        logits = start(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_p = torch.log_softmax(logits[:, :-1].double(), -1)
    log_p = log_p.gather(2, batch["labels"][:, 1:].clamp(0)[..., None])[..., 0]
    response = batch["labels"][:, 1:] != eksft.IGNORE_INDEX
    expected = float(-(log_p.exp() * log_p)[response].sum() / response.sum())
    assert row["loss"] == pytest.approx(expected, rel=1e-4)


def test_too_long_truncate_cuts_instead_of_dropping_and_is_recorded(tmp_path, capsys):
    """--too-long truncate (the released recipe's choice) cuts an example at --max-len instead of
    dropping it: at 310 tokens, just over the shortest synthetic example (297), drop skips most
    candidates and truncate none; args.json records the choice."""
    argv = ["--model", "tiny", "--max-steps", "1", "--max-len", "310", "--num-samples", "16",
            "--batch-size", "16", "--save-every", "0"]
    eksft.train(eksft.parse_args(argv + ["--output-dir", str(tmp_path / "drop")]))
    assert re.search(r"data: 16 examples, [1-9]\d* dropped as longer", capsys.readouterr().out)
    eksft.train(eksft.parse_args(argv + ["--too-long", "truncate", "--output-dir",
                                         str(tmp_path / "cut")]))
    log = capsys.readouterr().out
    assert re.search(r"data: 16 examples, [1-9]\d* truncated to --max-len 310, 0 dropped", log), log
    assert json.load(open(tmp_path / "cut" / "args.json"))["too_long"] == "truncate"
    assert json.load(open(tmp_path / "drop" / "args.json"))["too_long"] == "drop"


def test_start_run_files_keeps_the_rows_before_the_start(tmp_path):
    """A resume at step 1 keeps the rows of steps 0 and 1 (rl.py logs a step-0 held-out accuracy);
    a fresh run (step 0) in the same directory keeps none, not even the old step-0 row."""
    old = [{"step": 0, "eval_accuracy": 0.5}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    for start, kept in ((1, [0, 1]), (0, [])):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
        path = eksft.start_run_files(str(tmp_path), {"seed": 0}, start)
        assert [json.loads(l)["step"] for l in open(path)] == kept
        assert json.load(open(tmp_path / "args.json")) == {"seed": 0}
