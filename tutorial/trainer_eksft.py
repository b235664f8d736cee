"""
EKSFT with Hugging Face's Trainer (or TRL's SFTTrainer), for many GPUs with accelerate.

    python tutorial/trainer_eksft.py --model tiny --max-steps 2          # offline CPU check
    torchrun --standalone --nproc_per_node 2 tutorial/trainer_eksft.py --model tiny --max-steps 2 \
        --sampling random                                                # 2 CPU processes (DDP)
    accelerate launch --config_file zero3.yaml tutorial/trainer_eksft.py \
        --model Qwen/Qwen3-8B-Base \
        --per-device-batch-size 1 --grad-accum 8 --max-len 20000 --bf16 --gradient-checkpointing

The data and the loss are eksft.py's (data.load_conversations, data.build_sft_examples,
eksft.eksft_trainer_class wrapping eksft_loss_lean): only the engine changes. --method sft and
--method dft are the baselines, as in eksft.py. Defaults follow the released recipe: ratio 0.2,
union, lambdas 0.05, lr 1e-5 cosine, 1% warmup, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0,
8 epochs. The per-step log (loss, grad_norm, eksft/masked_frac, ...)
is printed and saved to --output-dir/trainer_state.json; with N processes it covers all of them.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data import UserError, build_sft_examples, collate, load_conversations  # noqa: E402
from eksft import eksft_trainer_class, load_model_and_tokenizer  # noqa: E402


def main(args):
    from transformers import Trainer, TrainingArguments
    model, tokenizer = load_model_and_tokenizer(args.model, torch.device("cpu"))
    data = args.data or ("synthetic" if args.model == "tiny" else "openr1-3k")
    examples = build_sft_examples(tokenizer, load_conversations(data, seed=args.seed), args.max_len,
                                  args.num_samples)
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0.01, weight_decay=0.1, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps else -1, bf16=args.bf16,
        activation_checkpointing=args.gradient_checkpointing, logging_steps=1, report_to="none",
        save_strategy="no", seed=args.seed, use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False, train_sampling_strategy=args.sampling)
    EKSFTTrainer = eksft_trainer_class(Trainer)
    trainer = EKSFTTrainer(
        model=model, args=training_args, train_dataset=examples, processing_class=tokenizer,
        data_collator=lambda rows: collate(rows, tokenizer.pad_token_id),
        eksft_options=loss_options(args))
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():  # one process writes; losses are averaged over processes
        trainer.state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        print(f"done: {len(losses)} steps on {training_args.world_size} process(es), last loss "
              f"{losses[-1] if losses else float('nan'):.4f}; model in {args.output_dir} "
              f"(per-step log in trainer_state.json)")


def loss_options(args):
    """eksft_loss's keyword arguments: --method sft and dft turn selection and the regularisers
    off (ratio 0, lambdas 0: no reference model is built); dft weights each token's CE by
    p(target)."""
    if args.method in ("sft", "dft"):
        return dict(ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0, dft=args.method == "dft")
    return dict(ratio=args.ratio, combine=args.combine, lambda_entropy=args.lambda_entropy,
                lambda_kl=args.lambda_kl)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="EKSFT through transformers.Trainer (accelerate).")
    p.add_argument("--model", default="tiny", help="tiny | short name | hub id | local dir")
    p.add_argument("--data", default=None, help="as eksft.py --data (default: synthetic for tiny, "
                   "openr1-3k otherwise)")
    p.add_argument("--num-samples", type=int, default=3000, help="examples that fit --max-len")
    p.add_argument("--max-len", type=int, default=4096, help="drop longer examples")
    p.add_argument("--method", default="eksft", choices=["eksft", "sft", "dft"],
                   help="as eksft.py --method: sft and dft ignore the four options below")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction selected by entropy, by KL")
    p.add_argument("--combine", default="union", choices=["union", "intersection"], help="E and K")
    p.add_argument("--lambda-entropy", type=float, default=0.05, help="entropy bonus weight")
    p.add_argument("--lambda-kl", type=float, default=0.05, help="KL penalty weight")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--per-device-batch-size", type=int, default=1, help="sequences per GPU pass")
    p.add_argument("--grad-accum", type=int, default=8, help="gradient accumulation steps")
    p.add_argument("--epochs", type=float, default=8, help="passes over the data")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: use --epochs)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--sampling", default="group_by_length", choices=["group_by_length", "random"],
                   help="group_by_length: little padding, but the grouping depends on the "
                   "per-device batch and --grad-accum; random: the same steps for any number of "
                   "processes")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--output-dir", default="runs/trainer-eksft", help="where the model goes")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
    if torch.distributed.is_initialized():
        # A process of a multi-process run ends here, its work written: tearing gloo's process group
        # down at interpreter exit can abort ("terminate called without an active exception") or
        # deadlock (the group's thread waits for the GIL that the exiting main thread holds), as
        # seen here with torch 2.13 on CPU. So skip the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
