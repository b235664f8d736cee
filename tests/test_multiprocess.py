"""Multi-process training equals one process: tutorial/trainer_eksft.py on 2 CPU processes (torchrun,
gloo, DistributedDataParallel) against 1 process with the same global batch, for EKSFT and SFT.

Same 8 sequences per optimizer step: 2 processes x 2 sequences x 2 accumulation steps, and 1 process
x 2 x 4, in the same order (--sampling random: the shuffled order does not depend on the number of
processes). What must hold: the Trainer adapter sums the response-token count and the selection
slots over processes and multiplies the loss by the world size, since DDP averages gradients. Then
every step's loss and gradient norm, and the final weights, equal the 1-process run's up to the
order of floating-point sums. (The weights alone would not show a missing world-size factor: AdamW
and clipping are blind to the gradient's scale. The logged loss and gradient norm halve: checked.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")  # transformers.Trainer needs it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["tutorial/trainer_eksft.py", "--model", "tiny", "--num-samples", "24", "--max-len", "400",
          "--max-steps", "3", "--lr", "1e-3", "--sampling", "random", "--per-device-batch-size", "2"]
METHODS = {"eksft": [], "sft": ["--ratio", "0", "--lambda-entropy", "0", "--lambda-kl", "0"]}


def results(out):
    """The per-step log lines of the run's trainer_state.json, and the final weights."""
    from safetensors.torch import load_file
    history = json.load(open(out / "trainer_state.json"))["log_history"]
    return [h for h in history if "loss" in h], load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_equal_one(tmp_path, method, capsys):
    # 1 process x 2 sequences x 4 accumulation steps, in this process (the script's main)
    sys.path.insert(0, os.path.join(ROOT, "tutorial"))
    import trainer_eksft
    trainer_eksft.main(trainer_eksft.parse_args(COMMON[1:] + METHODS[method] + [
        "--grad-accum", "4", "--output-dir", str(tmp_path / "one")]))
    assert "done: 3 steps on 1 process(es)" in capsys.readouterr().out
    one_steps, one_weights = results(tmp_path / "one")

    # 2 processes x 2 sequences x 2 accumulation steps: torchrun, gloo on CPU
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *COMMON, *METHODS[method], "--grad-accum", "2", "--output-dir", str(tmp_path / "two")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "done: 3 steps on 2 process(es)" in result.stdout
    two_steps, two_weights = results(tmp_path / "two")

    assert len(one_steps) == len(two_steps) == 3
    for one, two in zip(one_steps, two_steps):  # loss, grad_norm, eksft/masked_frac, ...
        keys = [k for k in one if k == "loss" or k == "grad_norm" or k.startswith("eksft/")]
        assert len(keys) == (6 if method == "eksft" else 4)
        assert {k: two[k] for k in keys} == pytest.approx({k: one[k] for k in keys}, rel=1e-5, abs=1e-7)
    assert one_weights.keys() == two_weights.keys()
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=0, atol=1e-6)
    # a test with teeth: training moved the weights by far more than that tolerance
    import eksft
    start = eksft.load_model_and_tokenizer("tiny", torch.device("cpu"))[0].state_dict()
    assert max(float((one_weights[n] - start[n]).abs().max()) for n in one_weights) > 1e-3
