"""Scaling out: eksft_loss inside transformers.Trainer gives eksft.py's own losses on the same batches."""
import json

import pytest
import torch

import eksft
from data import build_sft_examples, load_conversations, step_batches

pytest.importorskip("accelerate")  # transformers.Trainer needs it; eksft.py's own loop does not

ARGS = ["--model", "tiny", "--num-samples", "32", "--batch-size", "8", "--micro-batch-size", "4",
        "--max-len", "400", "--max-steps", "3", "--schedule", "constant", "--warmup", "0",
        "--weight-decay", "0", "--lr", "3e-3", "--save-every", "0"]


@pytest.mark.parametrize("method", ["eksft", "sft", "dft"])
def test_trainer_adapter_matches_the_loop(tmp_path, method):
    from transformers import Trainer, TrainingArguments

    # eksft.py's own loop
    args = eksft.parse_args(ARGS + ["--method", method, "--output-dir", str(tmp_path / "loop")])
    eksft.train(args)
    loop_rows = [json.loads(l) for l in open(tmp_path / "loop" / "metrics.jsonl")]
    loop_losses = [row["loss"] for row in loop_rows]

    # the same model, examples and step order through transformers.Trainer
    model, tok = eksft.load_model_and_tokenizer("tiny", torch.device("cpu"), seed=args.seed)
    examples = build_sft_examples(tok, load_conversations(args.data, seed=args.seed), args.max_len,
                                  args.num_samples, log=lambda *_: None)
    plan = step_batches([len(e["input_ids"]) for e in examples], args.batch_size, args.seed)
    ordered = [examples[i] for step in plan[: args.max_steps] for i in step]

    class SequentialEKSFTTrainer(eksft.eksft_trainer_class(Trainer)):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    training_args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=args.grad_clip,
        max_steps=args.max_steps, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", seed=args.seed, optim="adamw_torch", dataloader_num_workers=0)
    from data import collate
    trainer = SequentialEKSFTTrainer(
        model=model, args=training_args, train_dataset=ordered,
        data_collator=lambda rows: collate(rows, tok.pad_token_id),
        eksft_options=eksft.loss_options(args))
    assert (trainer.ref_model is None) == (method != "eksft")
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    hf_losses = [h["loss"] for h in logged]
    assert len(hf_losses) == args.max_steps
    assert hf_losses == pytest.approx(loop_losses, rel=1e-5), (hf_losses, loop_losses)
    # the logged statistics cover the whole step (both micro-batches), as the loop's do
    keys = ["masked_frac", "entropy"] + (["kl", "iou"] if method == "eksft" else [])
    for h, row in zip(logged, loop_rows):
        assert {k: h[f"eksft/{k}"] for k in keys} == pytest.approx({k: row[k] for k in keys}, rel=1e-5)


def test_reward_function_with_trls_calling_convention():
    """GRPOTrainer calls reward_funcs(prompts=..., completions=..., completion_ids=...,
    trainer_state=..., **dataset columns) by keyword; conversational completions are message lists."""
    from rl import grpo_reward_fn
    prompts = [[{"role": "user", "content": "2+2?"}]] * 3
    completions = [[{"role": "assistant", "content": "so \\boxed{4}"}],
                   [{"role": "assistant", "content": "The answer is 4.0"}],
                   [{"role": "assistant", "content": "\\boxed{5}"}]]
    rewards = grpo_reward_fn(prompts=prompts, completions=completions, completion_ids=[[1], [2], [3]],
                             trainer_state=None, answer=["4", "4", "4"], question=["2+2?"] * 3)
    assert rewards == [1.0, 1.0, 0.0]


def test_trl_grpo_example_runs_offline(tmp_path):
    pytest.importorskip("trl")
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "tutorial/trl_grpo.py", "--model", "tiny", "--max-steps", "2",
                             "--max-new-tokens", "16", "--limit", "16", "--group-size", "4",
                             "--output-dir", str(tmp_path / "trl")],
                            cwd=root, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: 2 steps" in result.stdout
    assert os.path.exists(tmp_path / "trl" / "config.json")


@pytest.mark.parametrize("num_items", [None, 300])
def test_dft_equals_trls_dft_loss(tmp_path, num_items):
    """eksft_loss(dft=True) against TRL's own: SFTTrainer(loss_type="dft").compute_loss on the same
    model and batch, per-batch mean and with a given token count (num_items_in_batch): the loss
    and every parameter's gradient."""
    pytest.importorskip("trl", reason="trl is not installed: TRL's DFT loss cannot be compared")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from data import collate
    tok = eksft.char_tokenizer()
    model = eksft.tiny_model(tok, seed=0)
    with torch.no_grad():  # peakier rows than random init, so p(target) spreads over (0, 1)
        model.lm_head.weight.mul_(30)
    config = SFTConfig(output_dir=str(tmp_path), loss_type="dft", report_to="none", use_cpu=True,
                       bf16=False, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, processing_class=tok,
                         train_dataset=Dataset.from_dict({"text": ["a b c", "d e f"]}))
    examples = build_sft_examples(tok, load_conversations("synthetic")[:3], 512, log=lambda *_: None)
    batch = collate(examples, tok.pad_token_id)
    trainer.model.train()

    trl_loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad()
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss, _ = eksft.eksft_loss(logits, batch["labels"], None, ratio=0.0, lambda_entropy=0.0,
                               lambda_kl=0.0, dft=True, ce_normalizer=num_items)
    loss.backward()

    torch.testing.assert_close(loss.detach(), trl_loss.detach(), rtol=1e-5, atol=1e-7)
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param.grad, trl_grads[name], rtol=1e-4, atol=1e-8, msg=name)
    # with teeth: DFT's value is not the plain CE's here
    plain, _ = eksft.eksft_loss(logits.detach(), batch["labels"], None, ratio=0.0,
                                lambda_entropy=0.0, lambda_kl=0.0, ce_normalizer=num_items)
    assert abs(float(plain) - float(loss.detach())) > 0.05 * float(plain)
