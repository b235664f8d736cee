"""
GRPO with TRL's GRPOTrainer, rewarded by eksft's answer checker (rl.grpo_reward_fn).

    pip install trl
    python tutorial/trl_grpo.py --model tiny --max-steps 2               # offline CPU check
    python tutorial/trl_grpo.py --model runs/eksft-0.5b --data gsm8k     # one GPU
    accelerate launch --num_processes 8 tutorial/trl_grpo.py --model runs/eksft-7b --data gsm8k

rl.py is the readable single-GPU version of this stage; use this script when you need TRL's
engine (vLLM generation, DeepSpeed, many GPUs). The reward is exactly rl.py's and evaluate.py's
checker, and the prompt is the same chat prompt (system: "Please reason step by step, ...").
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data import ArgumentParser, HelpFormatter, load_qa, prompt_messages, run_cli  # noqa: E402
from eksft import load_model_and_tokenizer  # noqa: E402
from rl import grpo_reward_fn  # noqa: E402


def main(args):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rows = load_qa("synthetic-train" if args.data == "synthetic" else
                   "gsm8k-train" if args.data == "gsm8k" else args.data, limit=args.limit)
    # conversational prompts: TRL applies the model's chat template; "answer" reaches the reward
    dataset = Dataset.from_list([{"prompt": prompt_messages(r["question"]), "answer": r["answer"]}
                                 for r in rows])
    gpu = torch.cuda.is_available()
    model, tokenizer = load_model_and_tokenizer(args.model, torch.device("cpu"))
    config = GRPOConfig(
        output_dir=args.output_dir, num_generations=args.group_size,
        per_device_train_batch_size=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=1.0, learning_rate=args.lr, max_steps=args.max_steps, logging_steps=1,
        beta=0.0, bf16=gpu, use_cpu=not gpu, report_to="none", save_strategy="no",
        use_vllm=args.vllm)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=config,
                          train_dataset=dataset, reward_funcs=[grpo_reward_fn])
    trainer.train()
    trainer.save_model(args.output_dir)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print(f"done: {len(rewards)} steps, mean reward per step {[round(r, 3) for r in rewards]}; "
          f"model in {args.output_dir}")


if __name__ == "__main__":
    parser = ArgumentParser(description="GRPO with TRL and eksft's math checker.",
                            formatter_class=HelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | short name | hub id | local dir")
    parser.add_argument("--data", default="synthetic", help="synthetic | gsm8k | local .jsonl "
                        "with question and answer")
    parser.add_argument("--limit", type=int, default=None, help="use the first N questions")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="completion length limit")
    parser.add_argument("--lr", type=float, default=1e-6, help="learning rate")
    parser.add_argument("--max-steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--vllm", action="store_true", help="generate with vLLM (TRL's option)")
    parser.add_argument("--output-dir", default="runs/trl-grpo", help="where the model goes")
    run_cli(lambda: main(parser.parse_args()))   # bad input: one `error:` line, exit code 2
