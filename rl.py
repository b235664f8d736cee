"""RL with verifiable rewards (GRPO) from an SFT or EKSFT checkpoint.

EKSFT's second claim is that it gives RL a better starting point. To test it, run this file from
both checkpoints with the same flags, then compare them with evaluate.py.

    python rl.py --model tiny --max-steps 3                    # offline sanity run, ~20 s on 2 CPUs
    python rl.py --model runs/eksft-Qwen2.5-0.5B --data gsm8k  # from an eksft.py run, one GPU
    python rl.py --model runs/sft-Qwen2.5-0.5B --data gsm8k    # the SFT baseline, same flags
    python rl.py --model Qwen2.5-0.5B --no-std --loss-agg dr-grpo   # Dr. GRPO's choices

Read down: 1. the GRPO loss (torch only), 2. rollouts, 3. the loop, 4. the command line, 5. the
answer checker: it reads the answer a completion states and compares it with the gold.

Simplifications (choices, not accidents):
  1. --ppo-epochs 1 (the default) makes the ratio exactly 1 and the gradient A * grad log pi:
     REINFORCE with a group-mean baseline. K > 1 reuses a batch for K steps with PPO's clip.
  2. No value network, no GAE: every token of a completion gets that completion's advantage;
     a constant learning rate, no weight decay, one optimiser step per PPO epoch.
  3. Generation runs in the training process (no vLLM), in our own decoding loop (decode_batch):
     a row leaves the batch and the KV cache as soon as it ends, where transformers' generate
     keeps decoding it until the longest row ends; greedy output is identical (tested). It is
     most of a step's time. --static-cache uses generate (compiled decoding on a GPU).
  4. No KL penalty by default (--kl-coef 0: no reference model is loaded). With one, k3 is added
     to the loss as GRPO does, not subtracted from the reward (kl_penalty: which KL it follows).
  5. Flat groups (all G rewards equal) are kept, not resampled as DAPO does: advantage 0, still in
     the denominator and the KL term; a step of only flat groups and no KL makes no update.
  6. --model tiny is a random network that never answers a maths question: its sanity run learns
     a toy reward instead (--reward digits: the fraction of digits it writes).
  7. The maths reward scores only a stated answer (\\boxed, "the answer is X", "#### X"): a
     completion that states none earns 0, even when its last number is the gold. Measured on
     SmolLM2-135M-Instruct with the last-number fallback, 7 of 9 correct samples were looping,
     truncated text that happened to end on the gold number. --reward-last-number adds that
     fallback (evaluate.py's qwen-math protocol reads answers so).
  8. A truncated completion (no EOS within --max-new-tokens) is wrong and earns 0, whatever it
     states: on SmolLM2-135M-Instruct the truncated completions were loops, and those that state
     an answer state it inside the loop ("The answer is 18." 30 times over; 6 of 16 truncated of
     64 greedy GSM8K test answers at 512 tokens; 10 of 16 samples at temperature 1 and 256 tokens
     were truncated, none stated one). Paying them would teach the model not to stop; with
     --mask-truncated they would still lift their group's mean and push finished answers down.
     --reward-truncated grades them like any other completion (evaluate.py does).
"""
import atexit
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from typing import NamedTuple

import torch

import eksft   # plumbing: device, model loading, checkpoints, resume checks, Ctrl-C, JSON files
from data import (PROTOCOLS, SYSTEM_PROMPT, ArgumentParser, HelpFormatter, ModelDefaults,
                  UserError, encode_prompt, pad_left, pad_right, require, run_cli, stop_token_ids,
                  train_eval_sets)

# ----------------------------------------------------------------------------
# 1. The GRPO loss: tensors in, tensors out (torch only), to be read and pasted. A completion's
# advantage says how much better it scored than the G - 1 others sampled for its prompt, and every
# one of its tokens is pushed up (A > 0) or down (A < 0) by it.

LOSS_AGGS = ("token-mean", "seq-mean", "dr-grpo")
KL_ESTIMATORS = ("k3", "k3-corrected")


def group_advantages(rewards, group_size, *, scale_by_std=True, eps=1e-4):
    """Group-normalised advantages for G completions per prompt (rewards grouped consecutively).

        A_i = (r_i - mean_group(r)) / (std_group(r) + eps)   (std with Bessel's correction, as TRL)
        A_i =  r_i - mean_group(r)                           (scale_by_std=False: Dr. GRPO)

    Returns advantages (N,) and informative (N // G,) bool: False for a flat group (rewards all
    equal), whose advantages are exactly 0: no policy signal, but still a KL term if there is one.

    >>> adv, informative = group_advantages(torch.tensor([1., 0., 1., 1.]), 2, scale_by_std=False)
    >>> adv.tolist(), informative.tolist()
    ([0.5, -0.5, 0.0, 0.0], [True, False])
    """
    r = rewards.float().view(-1, group_size)                           # (P, G)
    advantages = r - r.mean(dim=1, keepdim=True)                       # (P, G) r_i - mean
    if scale_by_std:
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)   # (P, G) / (std + eps)
    informative = r.max(dim=1).values > r.min(dim=1).values            # (P,)
    advantages = advantages * informative.unsqueeze(1)                 # (P, G) exactly 0 if flat
    return advantages.view(-1), informative


def token_logprobs(logits, tokens, temperature=1.0):
    """log pi(token) under the SAMPLING distribution softmax(logits / temperature), and entropy.
    logits (B, T, V) are already aligned with tokens (B, T): logits[:, t] scores tokens[:, t].
    Returns logprobs (B, T) (with grad) and entropy (B, T) (detached, for logging)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)    # (B, T, V)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)        # (B, T)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(dim=-1)                     # (B, T) H = -sum_v p log p
    return chosen, entropy


def loss_normaliser(mask, loss_agg, max_new_tokens):
    """The loss's denominator, from the masks (N, T) of ALL the step's completions (flat groups
    included), once per step: the micro-batch split cannot change the update.
        token-mean: the loss-masked tokens of all N (every token weighs the same; TRL's "dapo")
        seq-mean:   N, each completion's tokens averaged first (TRL's "grpo")
        dr-grpo:    N x max_new_tokens (a constant: no length bias, Dr. GRPO)"""
    N = mask.shape[0]
    sizes = {"token-mean": mask.sum().item(), "seq-mean": N, "dr-grpo": N * max_new_tokens}
    if loss_agg not in sizes:
        raise ValueError(f"unknown loss aggregation {loss_agg!r}; choose one of {LOSS_AGGS}")
    return max(sizes[loss_agg], 1)


def kl_penalty(logprobs, ref_logprobs, ratio, estimator="k3"):
    """Per-token KL penalty (B, T) on tokens sampled from pi_old; log r = log ref - log pi.
        k3           = exp(log r) - log r - 1 >= 0, on-policy an unbiased estimate of KL(pi || ref);
                       its expected gradient E_pi[(1 - ref/pi) grad log pi] = -sum_x ref grad log pi
                       is that of KL(ref || pi) (GRPO's choice).
        k3-corrected = ratio * k3, ratio = pi / pi_old: the expected gradient under pi_old is that
                       of KL(pi || ref) (DeepSeek-V3.2; TRL 1.16's use_bias_correction_kl)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    log_r = ref_logprobs - logprobs                                    # (B, T) log r, r = ref / pi
    k3 = torch.exp(log_r) - log_r - 1                                  # (B, T) r - log r - 1
    return k3 * ratio if estimator == "k3-corrected" else k3


def policy_loss(logprobs, old_logprobs, advantages, mask, *, normaliser, loss_agg="token-mean",
                clip_eps=0.2, clip_eps_high=None, ref_logprobs=None, kl_coef=0.0,
                kl_estimator="k3"):
    """Clipped policy-gradient loss with an optional KL penalty, for one micro-batch.

    logprobs (B, T) of the current policy, with grad; old_logprobs (B, T) of the sampling policy
    (logprobs.detach() at the first update: ratio 1); ref_logprobs (B, T) of the frozen start;
    advantages (B,); mask (B, T). Returns the loss, over the step's normaliser (micro-batch losses
    add up), and sums to log (clipped: tokens whose gradient the clip removes, as TRL counts)."""
    mask = mask.float()                                                # (B, T)
    adv = advantages.unsqueeze(1)                                      # (B, 1) same A per token
    ratio = torch.exp(logprobs - old_logprobs)                         # (B, T) pi / pi_old
    high = clip_eps if clip_eps_high is None else clip_eps_high
    # L_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)
    unclipped = ratio * adv                                            # (B, T) ratio * A
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high) * adv         # (B, T) clip(ratio) * A
    per_token = -torch.min(unclipped, clipped)                         # (B, T) L_t
    kl = torch.zeros_like(logprobs)
    if kl_coef:                       # added to the loss (GRPO), not subtracted from the reward
        kl = kl_penalty(logprobs, ref_logprobs, ratio, kl_estimator)   # (B, T)
        per_token = per_token + kl_coef * kl                           # L_t + beta * KL_t
    # seq-mean: a completion's tokens weigh 1 / its length; otherwise every token weighs 1
    length = mask.sum(dim=1, keepdim=True).clamp(min=1) if loss_agg == "seq-mean" else 1  # (B, 1)
    loss = (per_token * (mask / length)).sum() / normaliser            # / the step's normaliser
    with torch.no_grad():
        stats = {"tokens": mask.sum().item(),
                 "clipped_tokens": ((clipped < unclipped).float() * mask).sum().item(),
                 "kl_sum": (kl * mask).sum().item()}
    return loss, stats


# ----------------------------------------------------------------------------
# 2. Rollouts: prompts are left padded so that every prompt ends in the same column and the
# completions start together. A completion ends at its FIRST end-of-sequence token: that token is
# kept (the model must learn to stop), everything after it is not. The pad id never marks the end:
# with pad == eos (several tokenizers), "not pad" would cut at the wrong place or not at all.

def completion_mask_from_eos(completion_ids, eos_ids):
    """mask (B, T) bool: True up to and including the first EOS; truncated (B,) bool: no EOS.

    >>> mask, truncated = completion_mask_from_eos(torch.tensor([[5, 2, 2], [5, 6, 7]]), [2])
    >>> mask.int().tolist(), truncated.tolist()
    ([[1, 1, 0], [1, 1, 1]], [False, True])
    """
    eos_ids = torch.as_tensor(list(eos_ids), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos_ids)            # (B, T)
    eos_before = is_eos.cumsum(dim=1) - is_eos.long()      # (B, T) EOS tokens strictly before t
    mask = eos_before == 0                                 # (B, T) t is at or before the first EOS
    truncated = ~is_eos.any(dim=1)                         # (B,)
    return mask, truncated


@torch.no_grad()
def generate_completions(model, tokenizer, prompt_ids, *, max_new_tokens, temperature=0.0,
                         top_p=1.0, batch_size=None, seed=None, static_cache=False,
                         use_generate=False):
    """Complete each prompt (a list of token ids) once; temperature 0 means greedy. Returns one
    dict per prompt: completion_ids (up to and including the first EOS), text (decoded without
    special tokens), truncated (no EOS within max_new_tokens). With a seed, batch b is sampled
    after torch.manual_seed(seed + b): same seed, same completions. Sampling settings are
    explicit, so a checkpoint's generation_config (top_k=20 for Qwen chat models) cannot change
    what the policy samples.

    decode_batch runs the batch: a row that has ended leaves it and the KV cache. Its greedy
    completions are identical to transformers' generate; its samples come from the same
    distribution, and are the same draws until a row of the batch ends (generate keeps drawing
    for ended rows, which shifts the random numbers of the others). use_generate=True, or
    static_cache=True (a KV cache of fixed size, whose decoding step transformers compiles on
    a GPU), runs transformers' model.generate instead."""
    eos_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    batch_size = batch_size or max(len(prompt_ids), 1)
    was_training, results = model.training, []
    model.eval()
    for b, start in enumerate(range(0, len(prompt_ids), batch_size)):
        if seed is not None:
            torch.manual_seed(seed + b)
        input_ids, attention_mask = pad_left(prompt_ids[start:start + batch_size], pad_id)  # (b, P)
        batch = dict(input_ids=input_ids.to(model.device), max_new_tokens=max_new_tokens,
                     attention_mask=attention_mask.to(model.device), temperature=temperature,
                     top_p=top_p, eos_ids=eos_ids, pad_id=pad_id)
        if static_cache or use_generate:
            completions = transformers_generate(model, **batch, static_cache=static_cache)
        else:
            completions = decode_batch(model, **batch)
        completions = completions.cpu()                              # (b, T) T <= max_new_tokens
        mask, truncated = completion_mask_from_eos(completions, eos_ids)
        for row, n, cut in zip(completions, mask.sum(dim=1).tolist(), truncated.tolist()):
            ids = row[:n].tolist()
            results.append({"completion_ids": ids, "truncated": cut,
                            "text": tokenizer.decode(ids, skip_special_tokens=True)})
    model.train(was_training)
    return results


def decode_batch(model, input_ids, attention_mask, *, max_new_tokens, temperature, top_p, eos_ids,
                 pad_id):
    """(B, T) new tokens of B left-padded prompts, T <= max_new_tokens, pad_id after a row's EOS.

    The loop generate runs (prefill, then one token per step with the KV cache), except that a
    row that writes EOS leaves the batch and the cache at once: a batch then costs what its
    running rows cost, not what its longest row costs at full width."""
    from transformers import DynamicCache
    cache_arg, keep_last = forward_arguments(model)
    eos = torch.tensor(eos_ids, device=input_ids.device)
    out = torch.full((input_ids.shape[0], max_new_tokens), pad_id, device=input_ids.device)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # (b,) rows still running
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)    # (b, P) pads: 0, as generate
    inputs = dict(input_ids=input_ids, position_ids=position_ids)
    cache = DynamicCache(config=model.config)   # config: sliding-window layers where it has them
    for t in range(max_new_tokens):
        logits = model(**inputs, attention_mask=attention_mask, **{cache_arg: cache},
                       use_cache=True, **keep_last).logits[:, -1].float()            # (b, V)
        if temperature <= 0:
            next_ids = logits.argmax(dim=-1)                                          # (b,)
        else:   # one draw per running row (generate draws for every row, ended or not)
            next_ids = torch.multinomial(next_token_probs(logits, temperature, top_p), 1)[:, 0]
        out[rows, t] = next_ids
        running = ~torch.isin(next_ids, eos)                                          # (b,)
        if not running.all():            # rows that wrote EOS leave the batch and the cache
            if not running.any():
                return out[:, :t + 1]
            keep = running.nonzero().squeeze(1)
            rows, next_ids, attention_mask = rows[keep], next_ids[keep], attention_mask[keep]
            position_ids = position_ids[keep]
            cache.batch_select_indices(keep)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1                                       # (b, 1)
        inputs = dict(input_ids=next_ids[:, None], position_ids=position_ids)
    return out


def next_token_probs(logits, temperature, top_p):
    """(b, V) sampling probabilities from (b, V) logits as transformers' TemperatureLogitsWarper
    and TopPLogitsWarper make them: softmax(logits / temperature) on the top-p nucleus, the
    smallest set of most likely tokens whose probability reaches top_p."""
    logits = logits / temperature
    if top_p < 1.0:
        ascending, order = logits.sort(dim=-1)                                        # (b, V)
        # drop the unlikely tail of total probability <= 1 - top_p; never the most likely token
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p                  # (b, V)
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)


def forward_arguments(model):
    """The KV cache's keyword (transformers 5: cache, 4.x: past_key_values), and logits_to_keep=1
    where the model takes it (the output layer for the last position only, as generate does)."""
    import inspect
    names = inspect.signature(model.forward).parameters
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in names else {}
    return ("cache" if "cache" in names else "past_key_values"), keep_last


def transformers_generate(model, input_ids, attention_mask, *, max_new_tokens, temperature, top_p,
                          eos_ids, pad_id, static_cache=False):
    """(B, T) new tokens from transformers' model.generate (a finished row is padded with pad_id
    while the batch goes on), optionally with a static KV cache."""
    options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    if temperature <= 0:   # greedy; None unsets the sampling settings of generation_config
        options = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if static_cache:   # its length rounded up to 256, so that few shapes are compiled
        length = 256 * math.ceil((input_ids.shape[1] + max_new_tokens) / 256)
        options.update(cache_implementation="static", max_cache_len=length)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,      # (B, P + T)
                         max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                         repetition_penalty=1.0, use_cache=True, **options)
    return out[:, input_ids.shape[1]:]


class RolloutBatch(NamedTuple):
    """Training tensors for B (prompt, completion) pairs; every completion starts at column P."""
    input_ids: torch.Tensor        # (B, P + T) prompt, then completion
    attention_mask: torch.Tensor   # (B, P + T) 0 on padding
    position_ids: torch.Tensor     # (B, P + T) counted from each prompt's first token, as generate
    completion_ids: torch.Tensor   # (B, T)
    loss_mask: torch.Tensor        # (B, T) bool: the completion's tokens, up to its first EOS

    def rows(self, index, device):
        """The micro-batch of these rows (a list of row numbers), on device, cut to ITS longest
        prompt and completion: the columns where all its rows are padding go (they change no
        log-prob: padding is masked out of attention, and position ids count real tokens only)."""
        P = self.input_ids.shape[1] - self.completion_ids.shape[1]        # prompt columns
        attention = self.attention_mask[index]                             # (b, P + T)
        prompt = int(attention[:, :P].sum(dim=1).max())      # prompts end at column P (left pad)
        completion = int(attention[:, P:].sum(dim=1).max())  # completions start at P (right pad)
        columns = slice(P - prompt, P + completion)          # (b, prompt + completion) kept
        return RolloutBatch(self.input_ids[index][:, columns].to(device),
                            attention[:, columns].to(device),
                            self.position_ids[index][:, columns].to(device),
                            self.completion_ids[index][:, :completion].to(device),
                            self.loss_mask[index][:, :completion].to(device))


def rollout_tensors(prompt_ids, completion_ids, pad_id):
    """A RolloutBatch from B prompts and their completions (lists of token ids, each completion
    already cut at its first EOS)."""
    prompts, prompt_attn = pad_left(prompt_ids, pad_id)                # (B, P)
    completions, completion_attn = pad_right(completion_ids, pad_id)   # (B, T)
    attention_mask = torch.cat([prompt_attn, completion_attn], dim=1)  # (B, P + T)
    return RolloutBatch(input_ids=torch.cat([prompts, completions], dim=1),  # (B, P + T)
                        attention_mask=attention_mask,
                        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
                        completion_ids=completions, loss_mask=completion_attn.bool())


def sequence_logprobs(model, batch, temperature):
    """Log-probs and entropies (B, T) of the completion tokens of a RolloutBatch."""
    T = batch.completion_ids.shape[1]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, logits_to_keep=T + 1).logits  # (B, T + 1, V)
    # the causal shift: logits[:, t] predicts input_ids[:, t + 1], so the first T of the last
    # T + 1 positions score the T completion tokens
    return token_logprobs(logits[:, :-1], batch.completion_ids, temperature)


# ----------------------------------------------------------------------------
# 3. The loop: sample G completions per prompt, score them, update, log, evaluate, checkpoint

def rl_step(model, ref_model, optimizer, prompts, rollouts, advantages, args, pad_id, device,
            autocast):
    """--ppo-epochs optimiser steps on ALL N completions of one step; returns metric sums (over
    the loss-masked tokens of all N). A flat group's completion (advantage 0) adds nothing to the
    policy term: without KL, no backward pass, only a forward without grad for its entropy."""
    batch = rollout_tensors(prompts, [r["completion_ids"] for r in rollouts], pad_id)
    mask = batch.loss_mask                                              # (N, T)
    if args.mask_truncated:              # still in their group's mean, but no loss of their own
        mask[torch.tensor([r["truncated"] for r in rollouts])] = False
    normaliser = loss_normaliser(mask, args.loss_agg, args.max_new_tokens)   # once, for all N
    has_loss = mask.any(dim=1)                                          # (N,)
    needs_grad = has_loss & ((advantages != 0) | (args.kl_coef > 0))   # (N,)
    # micro-batches of rows of similar lengths (sorted by completion, then prompt length), each
    # cut to its own longest row (RolloutBatch.rows): a long completion no longer pads them all
    by_length = torch.tensor(sorted(range(len(rollouts)), key=lambda i: (
        len(rollouts[i]["completion_ids"]), len(prompts[i]))), dtype=torch.long)   # (N,)
    size = args.micro_batch_size         # row numbers of the rows kept, size at a time
    chunks = lambda keep: [rows for rows in by_length[keep[by_length]].split(size) if len(rows)]
    micro = chunks(needs_grad)
    sums = dict(tokens=mask.sum().item(), clipped_tokens=0, kl_sum=0.0, entropy_sum=0.0,
                loss=None, grad_norm=None, train_tokens=0)
    with torch.no_grad(), autocast():    # before any update
        for rows in chunks(has_loss & ~needs_grad):                     # entropy only
            mb = batch.rows(rows, device)
            entropy = sequence_logprobs(model, mb, args.temperature)[1]        # (b, T)
            sums["entropy_sum"] += (entropy * mb.loss_mask).sum().item()
        ref = [sequence_logprobs(ref_model, batch.rows(rows, device), args.temperature)[0]
               if ref_model is not None else None for rows in micro]   # (b, T) the frozen start
    if not micro:                        # nothing to learn from: no optimiser step at all
        return sums
    sums.update(loss=0.0, grad_norm=0.0)
    old = [None] * len(micro)            # (b, T) log-probs of the policy that sampled
    for epoch in range(args.ppo_epochs):
        for i, rows in enumerate(micro):
            mb = batch.rows(rows, device)
            with autocast():
                logprobs, entropy = sequence_logprobs(model, mb, args.temperature)  # (b, T) each
            if epoch == 0:               # no update yet: this IS the policy that sampled
                old[i] = logprobs.detach()
                sums["entropy_sum"] += (entropy * mb.loss_mask).sum().item()
            loss, stats = policy_loss(
                logprobs, old[i], advantages[rows].to(device), mb.loss_mask, normaliser=normaliser,
                loss_agg=args.loss_agg, clip_eps=args.clip_eps, clip_eps_high=args.clip_eps_high,
                ref_logprobs=ref[i], kl_coef=args.kl_coef, kl_estimator=args.kl_estimator)
            loss.backward()
            sums["clipped_tokens"] += stats["clipped_tokens"]
            sums["kl_sum"] += stats["kl_sum"] if epoch == 0 else 0.0   # KL of the sampler
            sums["loss"] += loss.item() / args.ppo_epochs
            sums["train_tokens"] += int(mb.attention_mask.sum())
        sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                  args.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sums["grad_norm"] /= args.ppo_epochs
    return sums


def train(args):
    """The RL loop; returns (model, tokenizer, the list of per-step metric dicts)."""
    from tqdm import tqdm
    run_args = dict(vars(args), checker_description=checker_description(args.checker))
    eksft.set_seed(args.seed)
    if args.model != "tiny":
        eksft.model_source(args.model)   # a mistyped name fails now, not after data and download
    eksft.check_output_dir(args.output_dir)
    device, amp_dtype, why = eksft.pick_device(args.device, args.precision)
    print(f"device: {device} ({why})")
    autocast = lambda: torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None)
    try:
        is_equiv("1", "1", args.checker)     # a missing math-verify fails now, not mid-run
    except ImportError as e:
        raise UserError(str(e)) from None
    reward_fn = reward_function(args)

    # data first: a bad file fails in a second, before any model is loaded
    train_rows, eval_rows = train_eval_sets(args.data, args.eval_size, args.seed)
    n, G = args.prompts_per_step, args.group_size
    if len(train_rows) < n:
        raise UserError(f"--data {args.data} has {len(train_rows)} training questions, fewer "
                        f"than --prompts-per-step {n}")
    print(f"data: {len(train_rows)} training questions, {len(eval_rows)} held out; "
          f"{n} prompts x {G} completions; reward {args.reward}")

    # the policy, possibly resumed: a longer run may continue (constant lr), --max-steps may change
    resume_from = eksft.checkpoint_to_resume(args, run_args, eksft.RESUME_MAY_CHANGE | {
        "max_steps", "eval_every", "print_every"})
    load = lambda name: eksft.load_model_and_tokenizer(name, device, seed=args.seed)
    model, tokenizer = load(resume_from or args.model)
    # the reference is --model (also after a resume), in fp32 like the policy: KL is 0 at step 1
    ref_model = load(args.model)[0].eval().requires_grad_(False) if args.kl_coef > 0 else None
    print(f"model: {resume_from or args.model}, stop tokens {stop_token_ids(model, tokenizer)}, "
          + ("a reference model for KL" if ref_model is not None else "no reference model"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start_step = eksft.restore_checkpoint(resume_from, optimizer) if resume_from else 0
    metrics_path = eksft.start_run_files(args.output_dir, run_args, start_step)

    def held_out_accuracy(step):     # greedy, on the held-out questions: logged and returned
        accuracy = evaluate_accuracy(model, tokenizer, eval_rows, args, autocast)
        eksft.append_jsonl(metrics_path, {"step": step, "eval_accuracy": accuracy})
        tqdm.write(f"step {step:5d} | held-out accuracy {accuracy:.3f} (greedy, "
                   f"{len(eval_rows)} questions)")
        return accuracy

    if eval_rows and start_step == 0:
        held_out_accuracy(0)
    history = []
    model.train()
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
               desc="rl", dynamic_ncols=True)
    ctrl_c = eksft.StopOnCtrlC(args.output_dir)   # Ctrl-C: the step in progress ends saved
    for step in ctrl_c.steps(bar):
        # 1. this step's prompts, from a seeded shuffle per epoch (a resumed run sees the same)
        epoch, i = divmod(step, len(train_rows) // n)
        shuffled = train_rows[:]
        random.Random(args.seed + epoch).shuffle(shuffled)
        rows = shuffled[i * n:(i + 1) * n]
        prompts = [encode_prompt(tokenizer, row["question"], args.system_prompt) for row in rows]
        prompts = [ids for ids in prompts for _ in range(G)]           # G adjacent copies of each
        golds = [row["answer"] for row in rows for _ in range(G)]

        # 2. rollouts, seeded per step, and their rewards
        t0 = time.perf_counter()
        with autocast():
            rollouts = generate_completions(
                model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, static_cache=args.static_cache,
                seed=args.seed * 1_000_003 + step)
        gen_seconds = time.perf_counter() - t0
        texts = [out["text"] for out in rollouts]
        scored = [reward_fn(out["text"], gold, out["truncated"])   # (reward, Verdict): one grade
                  for out, gold in zip(rollouts, golds)]
        rewards = torch.tensor([float(reward) for reward, _ in scored])                # (N,)
        correct = [verdict.correct for _, verdict in scored]

        # 3. advantages, and the update (flat groups have advantage 0: see rl_step)
        advantages, informative = group_advantages(rewards, G, scale_by_std=not args.no_std)
        t1 = time.perf_counter()
        sums = rl_step(model, ref_model, optimizer, prompts, rollouts, advantages, args,
                       tokenizer.pad_token_id, device, autocast)
        train_seconds = time.perf_counter() - t1

        # 4. metrics: one JSON line per step, a log line, and now and then two samples. Entropy,
        # KL and clip fraction are means over the loss-masked tokens of all sampled completions
        lengths = [len(out["completion_ids"]) for out in rollouts]
        tokens = sums["tokens"]                              # 0: --mask-truncated cut every one
        per_token = lambda total: total / tokens if tokens else None
        record = {
            "step": step + 1, "reward": rewards.mean().item(),
            "accuracy": sum(correct) / len(correct), "response_length": sum(lengths) / len(lengths),
            "truncated_frac": sum(out["truncated"] for out in rollouts) / len(rollouts),
            "entropy": per_token(sums["entropy_sum"]),
            "kl": per_token(sums["kl_sum"]) if ref_model is not None else None,
            "clip_frac": per_token(sums["clipped_tokens"] / args.ppo_epochs),
            "loss": sums["loss"], "grad_norm": sums["grad_norm"],
            "flat_groups": int((~informative).sum()), "groups": len(rows),
            "gen_tokens_per_s": sum(lengths) / gen_seconds,
            "train_tokens_per_s": sums["train_tokens"] / train_seconds or None}
        history.append(record)
        eksft.append_jsonl(metrics_path, record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}")
        if (step + 1) % args.log_every == 0:
            m = record
            tqdm.write(f"step {step + 1:5d} | reward {m['reward']:.3f} | acc {m['accuracy']:.3f} | "
                       f"len {m['response_length']:.0f} | trunc {m['truncated_frac']:.2f} | "
                       f"flat {m['flat_groups']}/{len(rows)} | "
                       + (f"H {m['entropy']:.3f} | clip {m['clip_frac']:.3f} | " if tokens else "")
                       + (f"KL {m['kl']:.4f} | " if m["kl"] is not None else "")
                       + f"gen {m['gen_tokens_per_s']:.0f} tok/s")
        if args.print_every and (step + 1) % args.print_every == 0:
            for k in sorted({int(rewards.argmax()), int(rewards.argmin())}):   # best and worst
                shown = "".join(c if c.isprintable() or c == "\n" else "?" for c in texts[k][:800])
                tqdm.write(f"--- sample {k} | gold {golds[k]} | extracted "
                           f"{scored[k][1].answer!r} | reward {rewards[k]:.3f}\n{shown}"
                           + (" [...]" if len(texts[k]) > 800 else ""))

        # 5. held-out accuracy and checkpoints (atomic: complete or absent)
        done = step + 1 == args.max_steps
        if eval_rows and (done or (args.eval_every and (step + 1) % args.eval_every == 0)):
            record["eval_accuracy"] = held_out_accuracy(step + 1)
        if done or ctrl_c.stop_here() or (args.save_every and (step + 1) % args.save_every == 0):
            eksft.save_checkpoint(args.output_dir, model, tokenizer, run_args, {"step": step + 1},
                                  optimizer)
            eksft.prune_checkpoints(args.output_dir, args.keep_checkpoints)
    bar.close()
    eksft.export_model(args.output_dir, model, tokenizer, run_args)
    print(f"done: model in {args.output_dir}, metrics in {metrics_path}; "
          f"next: python evaluate.py --model {args.output_dir}")
    return model, tokenizer, history


def reward_function(args):
    """reward(text, gold, truncated) -> (reward, Verdict): the completion graded once (grade, with
    --checker and --reward-last-number), its reward from --reward and --format-reward; a truncated
    one is wrong and earns 0 (docstring, item 8) unless --reward-truncated. Its verdict is also the
    logged accuracy and the printed 'extracted'."""
    def reward(text, gold, truncated=False):
        verdict = grade(text, gold, checker=args.checker, last_number=args.reward_last_number)
        if args.reward == "digits":   # a toy dense reward: the share of characters that are digits
            return sum(c.isdigit() for c in text) / max(len(text), 1), verdict
        if truncated and not args.reward_truncated:
            return 0.0, verdict._replace(correct=False)
        return verdict_reward(verdict, text, args.format_reward), verdict
    return reward


def evaluate_accuracy(model, tokenizer, rows, args, autocast):
    """Greedy held-out accuracy as evaluate.py --protocol args.eval_protocol scores it (prompt,
    answer extraction, checker), at the training budget --max-new-tokens to stay cheap."""
    proto = PROTOCOLS[args.eval_protocol]
    prompts = [encode_prompt(tokenizer, r["question"], proto["system_prompt"]) for r in rows]
    with autocast():
        outputs = generate_completions(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
            batch_size=args.prompts_per_step * args.group_size, static_cache=args.static_cache)
    verdicts = [grade(o["text"], r["answer"], checker=args.checker,
                      last_number=proto["last_number"]) for o, r in zip(outputs, rows)]
    return sum(v.correct for v in verdicts) / len(rows)


# ----------------------------------------------------------------------------
# 4. The command line

MODEL_DEFAULTS = {  # the defaults that depend on --model's kind (eksft.model_kind)
    # the tiny model and a toy reward: seconds on a CPU
    "tiny": dict(data="synthetic", reward="digits", lr=1e-3, prompts_per_step=4,
                 max_new_tokens=32, micro_batch_size=32, max_steps=20, eval_size=16,
                 print_every=5),
    # SmolLM2 (135M), a real model on a CPU
    "smol": dict(data="synthetic", reward="math", lr=1e-6, prompts_per_step=4, max_new_tokens=256,
                 micro_batch_size=8, max_steps=20, eval_size=32, print_every=5),
    # any other model: one GPU
    "hub": dict(data="gsm8k", reward="math", lr=1e-6, prompts_per_step=16, max_new_tokens=1024,
                micro_batch_size=4, max_steps=300, eval_size=200, print_every=10),
}


def parse_args(argv=None):
    p = ArgumentParser(description="RL with verifiable rewards (GRPO) for maths.",
                       formatter_class=HelpFormatter)
    defaults = ModelDefaults(p, MODEL_DEFAULTS)
    add = defaults.add   # a default left out (None) comes from MODEL_DEFAULTS, by the model's kind
    add("--model", default="tiny", help="checkpoint dir | hub id | short name (Qwen2.5-0.5B)")
    add("--data", help="gsm8k (its test split held out) | math500 | synthetic | local file")
    add("--output-dir", help="checkpoints, metrics, final model (default runs/rl-MODEL)")
    add("--system-prompt", default=SYSTEM_PROMPT, help="system turn of every prompt ('' for none: "
        "not even the default one SmolLM2's and Qwen2.5's chat templates write without one)")
    # reward
    add("--reward", choices=["math", "digits"], help="math: 1 for a right answer; digits: a toy")
    add("--checker", default=default_checker(), choices=CHECKERS, help="answer equivalence")
    add("--format-reward", type=float, default=0.0, help="reward for a wrong but \\boxed answer")
    fallback = p.add_mutually_exclusive_group()
    fallback.add_argument("--reward-last-number", action="store_true", help="score the last number "
                          "when no answer is stated: the qwen-math evaluation protocol's rule, off "
                          "for training")
    fallback.add_argument("--strict-reward", action="store_true", help="only a stated answer "
                          "scores: the default now, accepted for older commands")
    # rollouts
    add("--group-size", "-G", type=int, default=8, help="completions per prompt")
    add("--prompts-per-step", type=int, help="prompts per step")
    add("--max-new-tokens", type=int, help="completion budget")
    add("--temperature", type=float, default=1.0, help="sampling temperature, also in the loss")
    add("--top-p", type=float, default=1.0, help="nucleus sampling")
    add("--mask-truncated", action="store_true", help="no loss on completions without an EOS")
    add("--reward-truncated", action="store_true", help="grade a completion without an EOS like "
        "any other (default: it is wrong and earns 0; see the docstring)")
    add("--static-cache", action="store_true", help="static KV cache (compiled decoding on CUDA)")
    # loss
    add("--no-std", action="store_true", help="advantage r - mean, not divided by std (Dr. GRPO)")
    add("--loss-agg", default="token-mean", choices=LOSS_AGGS, help="how token losses are averaged")
    add("--ppo-epochs", type=int, default=1, help="updates per batch (1: REINFORCE with baseline)")
    add("--clip-eps", type=float, default=0.2, help="PPO clip epsilon (lower; upper by default)")
    add("--clip-eps-high", type=float, help="separate upper epsilon (DAPO: 0.28)")
    add("--kl-coef", type=float, default=0.0, help="KL penalty weight (0: no reference model)")
    add("--kl-estimator", default="k3", choices=KL_ESTIMATORS, help="see kl_penalty")
    # optimisation
    add("--lr", type=float, help="AdamW learning rate")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    add("--micro-batch-size", type=int, help="completions per forward")
    add("--max-steps", type=int, help="optimiser steps")
    # run
    add("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    add("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="bf16 autocast, fp32")
    add("--seed", type=int, default=0, help="seed for the tiny model, prompt order and sampling")
    add("--eval-size", type=int, help="held-out questions (0: none)")
    add("--eval-every", type=int, default=50, help="held-out accuracy at start, end, every N steps")
    add("--eval-protocol", default="qwen-math", choices=PROTOCOLS, help="as evaluate.py --protocol")
    add("--log-every", type=int, default=1, help="print a metrics line every N steps")
    add("--print-every", type=int, help="print the best and worst completion every N steps")
    add("--save-every", type=int, default=50, help="checkpoint every N steps (0: at the end only)")
    add("--keep-checkpoints", type=int, default=2, help="keep the N newest checkpoints (0: all)")
    add("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    add("--allow-changed-args", action="store_true", help="--resume with other settings")
    args = p.parse_args(argv)
    args.model_kind = eksft.model_kind(args.model)   # tiny, smol or hub (a run: its model's)
    defaults.fill(args, args.model_kind)
    minimum = dict(group_size=2, prompts_per_step=1, max_new_tokens=1, ppo_epochs=1,
                   micro_batch_size=1, max_steps=1, log_every=1, eval_size=0, eval_every=0,
                   print_every=0, save_every=0, keep_checkpoints=0, kl_coef=0)
    require(p, args, [(k, getattr(args, k) >= n, f"at least {n}" if n else "0 or more")
                      for k, n in minimum.items()] + [
        (k, getattr(args, k) is None or getattr(args, k) > 0, "positive")
        for k in ("temperature", "lr", "grad_clip", "clip_eps", "clip_eps_high")] + [
        ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
        ("format_reward", 0 <= args.format_reward < 1, "in [0, 1) (a right answer earns 1)")])
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"rl-{os.path.basename(args.model.rstrip('/'))}")
    return args


# ----------------------------------------------------------------------------
# 5. The answer checker, all of it. grade gives one completion's verdict: extract_answer reads the
# final answer it states, normalise_answer spells that one way per value, is_equiv compares it with
# the gold; math_reward turns the verdict into a reward. Read down: these, then finding the answer,
# spelling it (rule tables, a comment per rule), comparing, the parser, the math-verify worker.
# The checkers:
#   builtin      a small parser: numbers exactly, expressions in one-letter variables by value;
#   math-verify  the math-verify package (sympy), in a worker process under a hard time limit;
#   auto         a builtin "equal" is final, and so is its "not equal" on numbers, tuples,
#                intervals, matrices and choices (math-verify rounds: 70001 = 70000 there);
#                anything else it rejects (\arcsin 1, \log_2 8, 2x+4y=3) goes on to math-verify.
# Under every checker a decimal never equals an irrational (3.14 is not \pi), and a check takes at
# most _CHECK_LIMIT_S. Nothing is eval'ed; loops are linear, recursion and exponents capped, errors
# caught: a 1 MB answer or 9^{9^{9^9}} takes milliseconds.

CHECKERS = ("builtin", "math-verify", "auto")
_CHECK_LIMIT_S = 0.8       # hard limit on one check (math-verify and a worker start included)
_MV_START_LIMIT_S = 30.0   # a worker not up after this is broken (it imports sympy: ~1.2 s of CPU)
MAX_ANSWER_CHARS = 1000   # an "answer" longer than this is compared as a plain string
MAX_BOXED_CHARS = 10_000  # a \boxed{...} longer than this is not an answer
TAIL_CHARS = 20_000       # answer phrases and the last number are looked for in the last 20,000


class Verdict(NamedTuple):
    """What grade decides about one completion."""
    correct: bool          # its answer is equivalent to the gold
    answer: str | None     # the answer compared: the stated one, else (last_number) the last
                           # formula or number, else None
    stated: bool           # it states an answer (extract_answer): \boxed, "the answer is", ####
    by_last_number: bool   # correct through the last-number fallback only (it states no answer)


def grade(completion, gold, *, checker=None, last_number=False):
    """The one definition of correct: the RL reward, rl.py's logged and held-out accuracy and
    evaluate.py's scores all come from this verdict. The answer the completion states
    (extract_answer) is compared with gold (is_equiv); a stated answer is final. A completion that
    states none is wrong, unless last_number=True (the qwen-math evaluation protocol's rule): then
    it is read as the Qwen2.5-Math harness and math-verify read it, by its last formula or number
    after any </think> (with auto or math-verify, by math-verify too).

    >>> grade("Kim has 70. The answer is 70.", "70", checker="builtin")
    Verdict(correct=True, answer='70', stated=True, by_last_number=False)
    >>> grade("So Kim has 70 apples now.", "70", checker="builtin")
    Verdict(correct=False, answer=None, stated=False, by_last_number=False)
    >>> grade("So Kim has 70 apples now.", "70", checker="builtin", last_number=True)
    Verdict(correct=True, answer='70', stated=False, by_last_number=True)
    """
    started, checker = time.monotonic(), _resolve_checker(checker)
    stated = extract_answer(completion)
    if stated is not None:
        return Verdict(is_equiv(stated, gold, checker), stated, True, False)
    if not (last_number and isinstance(completion, str) and isinstance(gold, str)):
        return Verdict(False, None, False, False)
    text = completion.rpartition("</think>")[2][-TAIL_CHARS:]
    answer = last_formula_or_number(text)
    correct = (answer is not None and checker != "math-verify" and is_equiv(answer, gold, "builtin")
               or checker != "builtin" and bool(_math_verify(text, gold, started, True)))
    return Verdict(correct, answer, False, correct)


def math_reward(completion, gold, *, checker=None, format_reward=0.0, last_number=True):
    """grade's verdict as a reward (verdict_reward). Here last_number=True by default: a completion
    that states no answer is read by its last formula or number, as evaluate.py's default protocol
    scores it; last_number=False is rl.py's training reward (and evaluate.py --protocol strict)."""
    verdict = grade(completion, gold, checker=checker, last_number=last_number)
    return verdict_reward(verdict, completion, format_reward)


def verdict_reward(verdict, completion, format_reward=0.0):
    """1.0 for a correct completion, else format_reward (default 0) if it is at least \\boxed,
    else 0.0."""
    if verdict.correct:
        return 1.0
    if format_reward and isinstance(completion, str) and boxed_answer(completion):
        return float(format_reward)
    return 0.0


def grpo_reward_fn(completions, answer, **kwargs):
    """Drop-in reward function for TRL's GRPOTrainer (dataset column "answer"):
    GRPOTrainer(..., reward_funcs=[grpo_reward_fn]). Completions may be strings or chat messages.
    As rl.py's default reward, only a stated answer scores."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [math_reward(t, a, last_number=False) for t, a in zip(texts, answer)]


def is_equiv(pred, gold, checker=None):
    """True when answers pred (the model's) and gold (the reference) mean the same thing under
    checker (default: default_checker()). Builtin normalises both (normalise_answer), drops
    names and glosses (x = 7, f^{-1}(x) = 2x+3, x \\in [1,2], \\approx 0.58), then compares numbers
    exactly (a decimal of 3+ significant digits also matches a rational that rounds to it:
    0.333 = 1/3), expressions in one-letter variables by value, tuples, intervals and matrices
    element by element, sets, lists and interval unions in any order, words ignoring case. Raises
    only on an unknown checker or a missing math-verify."""
    started, checker = time.monotonic(), _resolve_checker(checker)
    if not (isinstance(pred, str) and isinstance(gold, str) and pred.strip() and gold.strip()):
        return False
    if checker == "math-verify":
        return bool(_math_verify(pred, gold, started))
    try:
        if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return pred.strip() == gold.strip()
        a, b = normalise_answer(pred), normalise_answer(gold)
        # x = 7 and |AB| = 7 match 7 but not y = 7; an equation's left side (2x+y = 0) must match
        equation = a.equation or b.equation
        # x = 3, y = -2 is the point (3,-2) next to a point, and the list 3, -2 next to a list
        x = a.components if a.components and (b.components or b.text[:1] == "(") else a.text
        y = b.components if b.components and (a.components or a.text[:1] == "(") else b.text
        if (a.names == b.names or not (a.names and b.names or equation)) and _equiv(
                x, a.percent, y, b.percent):
            return True
        if checker == "builtin" or re.fullmatch("[A-Z]", a.text) or (
                a.numeric and b.numeric and not equation):
            return False                                   # auto: exact verdicts stay final
    except Exception:                                      # a checker bug must not stop training
        return False
    return bool(_math_verify(pred, gold, started))


def extract_answer(text, *, last_number=False):
    """The final answer of a completion as a string, or None (also for an empty answer). Only the
    text after </think> counts, only the inside of the last <answer>...</answer>. The last stated
    answer wins: the last \\boxed{...} (also \\fbox, `\\boxed 5`, boxes joined by "and" or commas)
    or a later "The (final) answer is X" / "Answer: X" that states a value (not "the answer is
    correct"); else the last "#### X" (GSM8K); else, with last_number=True (the Qwen2.5-Math
    harness's fallback; off for RL), the last number in the text."""
    if not isinstance(text, str):
        return None
    text = text[text.rfind("</think>") + len("</think>"):] if "</think>" in text else text
    close = text.rfind("</answer>")
    if (opening := text.rfind("<answer>", 0, max(close, 0))) >= 0:
        inner = text[opening + len("<answer>"):close]
        return _marked_answer(inner) or inner.strip() or None
    answer = _marked_answer(text)
    if not answer and (last := _HASHES_RE.match(text, max(text.rfind("####"), 0))):
        answer = _clean_sentence_answer(last.group(1))
    if not answer and last_number:
        numbers = _LAST_NUMBER_RE.findall(text[-TAIL_CHARS:].replace(",", ""))
        answer = numbers[-1] if numbers else None
    return answer or None


class Answer(NamedTuple):
    """One answer, normalised (normalise_answer)."""
    text: str          # the canonical string
    percent: bool      # it had a percent sign: 25% may mean 25 or 0.25
    names: list        # the left sides dropped, sorted: x = 7 -> ['x']
    components: str    # x = 3, y = -2 -> '(3,-2)': values in the order of their names, or None
    equation: bool     # a left side is an expression, not a name (2x+y = 0): it must match too
    numeric: bool      # no letters but those of \\frac, \\sqrt, \\pi, ... (_is_numeric)


def normalise_answer(s):
    """The Answer of one answer string."""
    if "\\boxed" in s or "\\fbox" in s:                  # a gold written as a completion
        s = _marked_answer(s) or s
    s = _MATRIX_RE.sub(_matrix_to_lists, s.strip())       # first: its \\ are not LaTeX spacing
    for pattern, replacement in _LATEX_RULES:
        s = pattern.sub(replacement, s)
    had_percent = "%" in s
    s = _strip_text_commands(s.replace("\\%", "").replace("%", ""))
    text, names, components = _drop_names(s.rstrip(". ").strip())
    text = _canonical(text)
    equation = any(re.search("[-+]", n) and not _NAME_RE.fullmatch(n) for n in names)
    return Answer(text, had_percent, names, components and _canonical(components), equation,
                  _is_numeric(text))


@functools.lru_cache(maxsize=None)
def default_checker():
    """"auto" when math-verify is installed, else "builtin": the default of --checker and below."""
    return "auto" if importlib.util.find_spec("math_verify") else "builtin"


def checker_description(checker=None):
    """For args.json: 'builtin', 'auto (builtin + math-verify 0.9.0)' or 'math-verify 0.9.0'."""
    checker = checker or default_checker()
    installed = default_checker() == "auto"
    version = importlib.metadata.version("math-verify") if installed else "(not installed)"
    if checker == "auto":
        return f"auto (builtin + math-verify {version})"
    return checker if checker == "builtin" else f"math-verify {version}"


def _resolve_checker(checker):
    """The checker to use. The first check that may need math-verify starts its worker, without
    waiting for it: it imports sympy while builtin decides the first answers."""
    checker = checker or default_checker()
    if checker not in CHECKERS:
        raise ValueError(f"unknown checker {checker!r}; choose one of {CHECKERS}")
    if checker != "builtin" and default_checker() == "builtin":
        raise ImportError(f"--checker {checker} needs the math-verify package: "
                          "pip install 'math-verify[antlr4_13_2]'")
    if (checker != "builtin" and not _pool.workers and _pool.failed_starts < 3
            and _pool.lock.acquire(False)):
        try:
            _start_workers(1)
        finally:
            _pool.lock.release()
    return checker


# Finding the answer: the last \boxed{...}, else a stated "answer is X", else "#### X".
_BRACE_RE = re.compile(r"[{}]")
_SPACES_RE = re.compile(r"[ \t]*")
_TOKEN_AFTER_BOX_RE = re.compile(r"[^\s$]+")
# "The (final) answer is X", "Final answer: X", "**Answer:** X", "Answer: X", "Answer $X$"
_ANSWER_PHRASE_RE = re.compile(
    r"(?i)\banswer(?:\s+is\b\s*:?|\s*\**\s*[:：]\s*\**|(?=\s*(?:\$|\\\(|\\\[)))")
_LEADING_NUMBER_RE = re.compile(r"[\s*]*(-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)(?![\d.]*[\w^{\\(])")
_STATES_A_VALUE_RE = re.compile(r"\s*\**\s*[-$\\\d(\[{]")   # "is 72", "is $x$", not "is correct"
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
# what may separate boxes that form one answer: "\boxed{-2} \quad\text{and}\quad \boxed{1}"
_BOX_GAP_RE = re.compile(
    r"(?:\s|[$,;.]|\\[\[\]()]|\\q?quad|\\[,;: ]|\\text\s*\{\s*(?:and|or|,)?\s*\}|and|or)*")
_LAST_NUMBER_RE = re.compile(r"-?\d*\.?\d+")   # the Qwen2.5-Math harness's, on text without commas
# $$x$$, $x$, \(x\), \[x\]: the formulas of a text (math-verify reads the last one)
_MATH_SPAN_RE = re.compile(r"\$\$(.{1,1000}?)\$\$|(?<!\\)\$(.{1,1000}?)(?<!\\)\$"
                           r"|\\\((.{1,1000}?)\\\)|\\\[(.{1,1000}?)\\\]", re.S)


def _closing_brace(text, j):
    """Index of the '}' that closes the '{' at text[j], looking at most MAX_BOXED_CHARS ahead."""
    depth = 0
    for m in _BRACE_RE.finditer(text, j, j + MAX_BOXED_CHARS):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return m.start()
    return None


def boxed_answer(text):
    """(start, answer) of the last complete \\boxed{...} / \\fbox{...} / `\\boxed 5`, joined with
    the boxes just before it that form one answer with it (`\\boxed{-2} and \\boxed{1}` -> '-2, 1'),
    or None. An unclosed \\boxed{ (a truncated answer) is skipped; only the last 20 are read."""
    found, before = [], {name: text.rfind(name) for name in ("\\boxed", "\\fbox")}
    for _ in range(20):                                    # from the last box backwards
        name = max(before, key=before.get)
        start = before[name]
        if start < 0:
            break
        before[name] = text.rfind(name, 0, start)
        pos = start + len(name)
        j = _SPACES_RE.match(text, pos).end()
        content = end = None
        if text[j:j + 1] == "{" and (close := _closing_brace(text, j)) is not None:
            content, end = text[j + 1:close], close + 1
        elif j > pos and (m := _TOKEN_AFTER_BOX_RE.match(text, j)):   # "\boxed 5", not \boxedfoo
            content, end = m.group().rstrip(".,;"), m.end()
        if not content or not content.strip():
            continue
        if found and (end > found[-1][0] or found[-1][0] - end > 40
                      or not _BOX_GAP_RE.fullmatch(text, end, found[-1][0])):
            break                                          # nested in it, or words in between
        found.append((start, content.strip()))
    return (found[0][0], ", ".join(c for _, c in reversed(found))) if found else None


def last_formula_or_number(text):
    """The last $...$ / \\(...\\) of a text unless a number follows it, else its last number."""
    formula = None
    for formula in _MATH_SPAN_RE.finditer(text):
        pass
    if formula and not re.search(r"\d", text[formula.end():]):
        return next(filter(None, formula.groups())).strip() or None
    numbers = re.findall(r"-?\d*\.?\d+(?:/\d+)?", text.replace(",", ""))   # 2/3 is one number
    return numbers[-1] if numbers else None


def _clean_sentence_answer(s):
    """'$\\frac{1}{2}$. Done.' -> '\\frac{1}{2}';  '**42**.' -> '42';  '\\[ 9 \\]' -> '9';
    a sentence in words ('The volume of $V$ is 120') -> its last formula or number ('120')."""
    s = s.strip().strip("*").strip()
    for opening, closing in (("$$", r"\$\$"), ("$", r"(?<!\\)\$"), ("\\(", r"\\\)"),
                             ("\\[", r"\\\]")):
        if s.startswith(opening):                          # a formula, perhaps unclosed
            end = re.compile(closing).search(s, len(opening))
            s = s[len(opening):end.start() if end else None]
            break
    else:
        s = re.split(r"\.(?:\s|$)|\n", s, maxsplit=1)[0]   # cut at the end of the sentence
        words = re.findall(r"(?<![\\A-Za-z])[A-Za-z]{3,}\b",
                           _MATH_SPAN_RE.sub("", s[:MAX_ANSWER_CHARS]))
        if len(s) <= MAX_ANSWER_CHARS and len(words) >= 2:        # a sentence, not "5 apples"
            s = last_formula_or_number(s) or s
    return re.sub(r"^[\s*]+|[\s*.]+$", "", s)              # markdown bold, the final full stop


def _marked_answer(text):
    """The last box, unless a later answer phrase states a value or says "final" (then the phrase's
    answer); else the last answer phrase; None without either."""
    phrase = None
    for phrase in _ANSWER_PHRASE_RE.finditer(text, max(0, len(text) - TAIL_CHARS)):
        pass
    boxed = boxed_answer(text)
    if phrase and (boxed is None or boxed[0] < phrase.start() and (
            "final" in text[max(0, phrase.start() - 8):phrase.start()].lower()
            or _STATES_A_VALUE_RE.match(text, phrase.end()))):
        after = text[phrase.end():phrase.end() + MAX_BOXED_CHARS]
        # overriding a box, the phrase gives the value it states FIRST ("The answer is 10 apples,
        # 2 more than Tom's 8" is 10), not a sentence's last number
        first = _LEADING_NUMBER_RE.match(after) if boxed else None
        answer = first[1].replace(",", "") if first else _clean_sentence_answer(after)
        if answer:
            return answer
    return boxed[1] if boxed else None


# Normalisation, step 1: LaTeX and notation, (pattern, replacement) applied in this order.
def _repeating_decimal(m):
    """0.1\\overline{6} -> \\frac{15}{90}: (all the digits - those before the repeating n) over
    10^k (10^n - 1), for k digits after the point before the repeating ones."""
    whole, fixed, repeat = m[1] or "0", m[2], m[3]
    return (f"\\frac{{{int(whole + fixed + repeat) - int(whole + fixed)}}}"
            f"{{{10 ** len(fixed) * (10 ** len(repeat) - 1)}}}")


_LATEX_RULES = [(re.compile(p, re.S), r) for p, r in [
    (r"\\\\(?=[A-Za-z])", r"\\"),                               # \\frac: a backslash escaped twice
    (r"[−–]", "-"),                                             # unicode minus and dash
    (r"×", r"\\times "), (r"·", r"\\cdot "), (r"÷", r"\\div "), (r"π", r"\\pi "),
    (r"∞", r"\\infty "), (r"∪", r"\\cup "), (r"≈", r"\\approx "),
    (r"²", "^2"), (r"³", "^3"),
    (r"(\d*)\.(\d{0,50})\\(?:overline|bar)\s*\{(\d{1,50})\}", _repeating_decimal),  # 0.\bar{3}
    (r"\\[dtc]frac(?![A-Za-z])", r"\\frac"),                     # \dfrac, \tfrac, \cfrac are \frac
    (r"\\(?:left|right|[bB]igg?[lr]?|displaystyle)(?![A-Za-z])", ""),   # sizing commands
    (r"(?<=\d)(?:\{,\}|,\\!\s?|\\[,!])(?=\d{3}(?!\d))", ","),    # 14{,}916, 2,\!500, 1\,234
    (r"\\[!,;: ]|\\q?quad(?![A-Za-z])|~", " "),                  # LaTeX spacing
    (r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|°", ""),   # degrees
    (r"\\[()\[\]]|\\?\$", ""),                                   # math delimiters, dollar signs
    (r"\\(?:leq?|leqslant)(?![A-Za-z])|≤", "<="),                # relations in one spelling
    (r"\\(?:geq?|geqslant)(?![A-Za-z])|≥", ">="),
    (r"\\neq?(?![A-Za-z])|≠", "!="), (r"\\lt(?![A-Za-z])", "<"), (r"\\gt(?![A-Za-z])", ">"),
    (r"\+\s*\\infty|\\infin(?:ity)?(?![A-Za-z])", r"\\infty"),   # +\infty = \infty
    (r",?\s*(?:\\(?:text\w*|mathrm)\s*\{\s*(?:and|or|,)\s*\}|\b(?:and|or)\b)|;", ","),   # 6 and 8
    (r"(\^\{?\d+\}?)\s+(?=\d)", r"\1*"),                          # 2^6 3^5 is a product
    (r"^(-?)(\d+)\s+(\d+)/(\d+)$", r"\1(\2+\3/\4)"),            # mixed number "1 1/2" = 1 + 1/2
    (r"\\+\s*$", ""),                                           # a stray trailing backslash: "185\"
]]
_UNITS = (r"(?:[kcm]m|kg|mg|ml|lbs?|oz|ft|in|yd|mi|mph|hrs?|hours?|mins?|minutes?|secs?|seconds?"
          r"|days?|weeks?|months?|years?|dollars?|cents?|miles?|met(?:er|re)s?|inch(?:es)?|feet"
          r"|foot|pounds?|lit(?:er|re)s?|gallons?|units?|degrees?)")
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    " sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update((w, 10 * i) for i, w in enumerate("thirty forty fifty sixty seventy eighty"
                                                       " ninety".split(), 3))
_TENS, _ONES = "|".join(list(_NUMBER_WORDS)[20:]), "|".join(list(_NUMBER_WORDS)[1:10])
# "five" is 5, but "one half", "two thirds", "five million", "zero point five" are not 1, 2, 5, 0
_SCALE_WORDS = (r"(?:hundred|thousand|[mbtr]illion|point|halfs?|halves|quarters?|thirds?|fourths?|"
                r"fifths?|sixths?|sevenths?|eighths?|ninths?|tenths?)s?\b")
_NUMBER_WORDS_RE = (rf"(?i)^(?:({_TENS})(?:[\s-]({_ONES}))?|({'|'.join(_NUMBER_WORDS)}))\b"
                    rf"(?![\s-]*{_SCALE_WORDS})")
# Step 4, once \text, names and glosses are gone: one spelling for one value.
_CANONICAL_RULES = [(re.compile(p), r) for p, r in [
    (_NUMBER_WORDS_RE, lambda m: str(_NUMBER_WORDS[(m[1] or m[3]).lower()]   # twenty-one -> 21
                                     + _NUMBER_WORDS.get(str(m[2]).lower(), 0))),
    (rf"^\s*(-?\d[\d,]*(?:\.\d+)?)\s*(?:{_UNITS}\b|\s(?!(?i:{_SCALE_WORDS}))[A-Za-z]+"
     r"(?:\s+[A-Za-z]+)*)\s*"
     r"(?:\^\{?[23]\}?)?\.?\s*$", r"\1"),                        # 10cm^2, 10 weeks -> 10 (not 6xy)
    (r"^\s*-?\d{1,3}(?:,\d{3})+(?:\.\d+)?\s*$", lambda m: m[0].replace(",", "")),   # 1,234
    (r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])", ""),                 # spaces, but one between letters
    (r"\\frac(\d)(\d)", r"\\frac{\1}{\2}"),                      # \frac12 -> \frac{1}{2}
    (r"\\frac(\d)\{", r"\\frac{\1}{"),
    (r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}"),
    (r"\\sqrt(\d+)", r"\\sqrt{\1}"),                             # \sqrt2 -> \sqrt{2}
    (r"(\d)\*(?=[A-Za-z\\(])", r"\1"),                           # 2*x -> 2x
    (r"([_^])\{(\w)\}", r"\1\2"),                                # x^{2} -> x^2
    (r"(?<![\d}])\.(\d)", r"0.\1"),                              # .5 -> 0.5
    (r"(\d\.\d*?)0+(?!\d)", r"\1"),                              # 2.50 -> 2.5
    (r"(\d)\.(?!\d)", r"\1"),                                    # 3. -> 3
    (r"^(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$", r"\1(\2+\3/\4)"),  # mixed number 7\frac{1}{2} = 7.5
    (r"^\(([A-Z])\)?$|^([A-Z])\)$", r"\1\2"),                    # choices: (B), B) -> B
    (r"^([^,]*?)\\pm([^,]*)$", r"\1+\2,\1-\2"),                  # 1\pm\sqrt{2}: both signs
    (r"^([^<>=]+)(<=?)[A-Za-z](<=?)([^<>=]+)$",                   # -2 <= x < 7 -> [-2,7)
     lambda m: f"{'[' if m[2] == '<=' else '('}{m[1]},{m[4]}{']' if m[3] == '<=' else ')'}"),
    (r"^([^<>=A-Za-z]+)([<>])(=?)([A-Za-z])$",                      # 5 >= x -> x <= 5
     lambda m: f"{m[4]}{'<' if m[2] == '>' else '>'}{m[3]}{m[1]}"),
    (r"^[A-Za-z]([<>])(=?)([^<>=]+)$",                            # x > 5 -> (5,\infty)
     lambda m: (f"{'[' if m[2] else '('}{m[3]},\\infty)" if m[1] == ">"
                else f"(-\\infty,{m[3]}{']' if m[2] else ')'}")),
]]
_TEXT_COMMAND_RE = re.compile(r"\\(?:text\w*|math(?:rm|bf|it|sf)|mbox|hbox|operatorname)\s*\{")
_MATRIX_RE = re.compile(r"(?:\\left\s*[\[(]\s*)?\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?"
                        r"(.*?)\\end\{\1\}(?:\s*\\right\s*[\])])?", re.S)
# x, a_{n+1}, \theta, f^{-1}(x), f'(x), P(A), \angle ABC, \overline{AB}
_NAME = (r"(?:\\angle\s*|\\overline\{)?\\?[A-Za-z]+\}?'*(?:[_^](?:\{[^{}=]{1,12}\}|\w))*"
         r"(?:\([^()=]{0,20}\))?")
_NAME_RE = re.compile(rf"\s*(?:{_NAME}|\(\s*{_NAME}(?:\s*,\s*{_NAME})*\s*\))\s*")   # or (a, b)
_NAME_IN_RE = re.compile(rf"^\s*{_NAME}\s*\\(?:in|approx)(?![A-Za-z])\s*")   # x \in [-2, 7]
_GLOSS_RE = re.compile(r"(?<=\S)\s*\\approx(?![A-Za-z]).*", re.S)     # \sqrt{3} \approx 1.73
_EQUALS_RE = re.compile(r"(?<![<>!=])=(?!=)")


def _canonical(s):
    for pattern, replacement in _CANONICAL_RULES:
        s = pattern.sub(replacement, s)
    return s


def _strip_text_commands(s):
    """\\text{cm} after a number is a unit: drop it. \\text{(B)} alone is the answer: unwrap it."""
    for _ in range(20):                                   # bounded: at most 20 \text blocks
        m = _TEXT_COMMAND_RE.search(s)
        if m is None:
            return s
        end = _closing_brace(s, m.end() - 1)
        if end is None:                                   # unbalanced: drop the command name only
            return s[:m.start()] + s[m.end() - 1:]
        before, inner, after = s[:m.start()], s[m.end():end], s[end + 1:]
        is_unit = (re.search(r"[\d}]\s*$", before)                    # "5 \text{cm}^2"
                   and re.fullmatch(r"\s*[A-Za-z][A-Za-z ./]*", inner)
                   and re.fullmatch(r"\s*(?:\^\s*\{?\d\}?)?\s*", after))
        s = before if is_unit else before + inner + after
    return s


def _matrix_to_lists(m):
    """\\begin{pmatrix}1 & 2\\\\ 3 & 4\\end{pmatrix} -> [[1,2],[3,4]] (any matrix kind)."""
    rows = [row for row in re.split(r"\\\\", m.group(2)) if row.strip()]
    return "[" + ",".join("[" + ",".join(row.split("&")) + "]" for row in rows) + "]"


def _is_numeric(s):
    """No letters but those of \\frac, \\sqrt, \\pi, \\infty, \\cdot, \\times, \\div."""
    return not re.search(r"[A-Za-z]", re.sub(r"\\(?:frac|sqrt|pi|infty|cdot|times|div)(?![A-Za-z])",
                                             "", s))


def _drop_names(s):
    """(answer, names, components): 'x = 7' -> '7', 'f(x) = 2x+3' -> '2x+3', '(a,b) = (2,7)' ->
    '(2,7)', '|AB| = 1' -> '1', a chain '1/2 = 2/4 = 0.5' -> its last side, 'x \\in [1, 2]' ->
    '[1, 2]', 'x = 1, y = 2' -> '1, 2' with components '(1,2)'. An equation ('2x + y = z',
    '7 = 11a + c') is kept whole."""
    parts, names, named = [], [], []
    for part in split_top_level(_GLOSS_RE.sub("", _NAME_IN_RE.sub("", s, count=1))):
        *left, right = _EQUALS_RE.split(part)
        if left and (all(_NAME_RE.fullmatch(x) for x in left) or _is_numeric(right)):
            part, new = right, [re.sub(r"\s+", "", x) for x in left if not _is_numeric(x)]
            if len(left) == 1 == len(new) and new[0][0] != "(":
                named.append((new[0], right))
            names += [n for x in new for n in (x[1:-1].split(",") if x[0] == "(" else [x])]
        parts.append(part)
    # components in name order (y, x -> x, y; a_{37}, a_3 -> a_3, a_{37}; r, \theta), except when
    # every name is Greek: then as written (\rho, \theta, \phi has no alphabetical convention)
    if not all(name.startswith("\\") for name, _ in named):
        named.sort(key=lambda item: item[0].lstrip("\\"))
    components = len(named) == len(parts) > 1 and f"({','.join(v for _, v in named)})"
    return ",".join(parts), sorted(names), components or None


def split_top_level(s):
    """Split at commas outside any bracket. '(1,(2,3))' inner -> ['1', '(2,3)']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return parts + [s[start:]]


# Comparing normalised answers: numbers exactly, expressions at sample points, then structure.
def _equiv(a, a_pct, b, b_pct, depth=0):
    """Equivalence of two normalised answers (see is_equiv)."""
    if a == b:
        return True
    if depth > 4:
        return False
    x, y = _to_number(a), _to_number(b)
    if x is not None and y is not None:
        return _numbers_equal(a, x, a_pct, b, y, b_pct)
    if _same_function(a, b):
        return True
    if "\\cup" in a + b:                                   # a union of intervals, in any order
        return _same_elements(a.split("\\cup"), b.split("\\cup"), depth)
    pa, pb = _bracketed(a), _bracketed(b)
    sets = [p is not None and p.brackets == "{}" for p in (pa, pb)]
    if any(sets):                                          # a set: an unordered list
        return _equiv(pa.inside if sets[0] else a, a_pct, pb.inside if sets[1] else b, b_pct,
                      depth + 1)
    if pa and pb:                                          # tuples, intervals, matrices
        ea, eb = split_top_level(pa.inside), split_top_level(pb.inside)
        return (pa.brackets == pb.brackets and len(ea) == len(eb)
                and all(_equiv(u, False, v, False, depth + 1) for u, v in zip(ea, eb)))
    if not pa and not pb and ("," in a or "," in b):       # "1, 2" vs "2,1,1": sets of solutions
        return _same_elements(split_top_level(a), split_top_level(b), depth)
    words = r"[A-Za-z]{2,}(?: [A-Za-z]+)*"                  # a text answer: Yes = yes
    return bool(re.fullmatch(words, a) and re.fullmatch(words, b)) and a.lower() == b.lower()


def _same_elements(ea, eb, depth):
    """Every element of each list equals one of the other's (at most 50 each, not both single)."""
    if max(len(ea), len(eb)) > 50 or len(ea) == 1 == len(eb):
        return False
    return all(any(_equiv(u, False, v, False, depth + 1) for v in other)
               for one, other in ((ea, eb), (eb, ea)) for u in one)


def _close(u, v):
    """Fractions are equal or not; a float (a value computed through an irrational) is equal to
    1e-12 relative: \\sqrt{2}\\sqrt{8} = 4 (but a WRITTEN decimal is never \\pi: _numbers_equal)."""
    if isinstance(u, Fraction) and isinstance(v, Fraction):
        return u == v
    return math.isclose(float(u), float(v), rel_tol=1e-12, abs_tol=1e-12)


def _numbers_equal(a, x, a_pct, b, y, b_pct):
    """Numbers x, y (values of the normalised answers a, b) are equal when _close, or when one is
    a decimal written with 3+ significant digits and the other a rational, not a literal, that
    rounds to it: 0.333 = 1/3, but 0.33 != 1/3 (two digits say too little), 70001 != 70000."""
    # a written decimal, perhaps in scientific notation: 2.5, 2.5\times10^{-3}
    decimal_re = re.compile(r"-?(\d*)\.(\d+)(?:\\(?:times|cdot)10\^\{?(-?\d{1,3})\}?)?")
    def forms(s, v, pct):   # [(value, decimal places if a rounding)]: 25% may mean 25 or 0.25
        m = decimal_re.fullmatch(s)
        places = len(m[2]) - int(m[3] or 0) if m and len((m[1] + m[2]).lstrip("0")) >= 3 else 0
        return [(v, places)] + ([(v / 100, places and places + 2)] if pct else [])
    if isinstance(x, Fraction) != isinstance(y, Fraction) and decimal_re.search(
            a if isinstance(x, Fraction) else b):    # a written decimal is never an irrational
        return False
    literal = [bool(re.fullmatch(r"-?\d+(?:\.\d+)?", s)) for s in (a, b)]
    return any(_close(u, v) or isinstance(u, Fraction) and isinstance(v, Fraction) and any(
                   places and not other_literal and 2 * abs(u - v) * Fraction(10) ** places <= 1
                   for places, other_literal in ((u_places, literal[1]), (v_places, literal[0])))
               for u, u_places in forms(a, x, a_pct) for v, v_places in forms(b, y, b_pct))


def _same_function(a, b):
    """Two expressions in the same one-letter variables (3x+3, (x+1)*3) with _close values at two
    sample points: an identity with near certainty (two different polynomials or rational
    functions agree only on a set of measure zero). Words (3+ letters), and text without an
    operator or a digit ('no', 'on'), are not expressions."""
    names = [{t for t in _TOKEN_RE.findall(s) if len(t) == 1 and t.isalpha()} for s in (a, b)]
    if (not names[0] or names[0] != names[1] or len(names[0]) > 5
            or any(re.search(r"(?<![\\A-Za-z])[A-Za-z]{3,}", s) or not re.search(r"[\d+\-*/^\\]", s)
                   for s in (a, b))):
        return False
    for point in (1, 2):                                   # values no simple answer is built around
        variables = {v: point + Fraction(2 * i + 3, 13) for i, v in enumerate(sorted(names[0]))}
        x, y = _to_number(a, variables), _to_number(b, variables)
        if x is None or y is None or not _close(x, y):
            return False
    return True


class _Bracketed(NamedTuple):
    brackets: str   # the opening and the closing one: "(]"
    inside: str     # what they enclose: "1,2"


def _bracketed(s):
    """'(1,2]' -> _Bracketed("(]", "1,2") when one bracket pair encloses the whole string, else
    None."""
    s = s.replace("\\{", "{").replace("\\}", "}")
    if len(s) < 2 or s[0] not in "([{" or s[-1] not in ")]}":
        return None
    depth = 0
    for ch in s[:-1]:
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0:                                     # closed before the end: "(1)+(2)"
            return None
    return _Bracketed(s[0] + s[-1], s[1:-1])


class _NotANumber(Exception):
    """What the parser raises when the text is not a number it can evaluate (_to_number: None)."""


_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|\\[A-Za-z]+|\S")
_FUNCTIONS = {"\\sin": math.sin, "\\cos": math.cos, "\\tan": math.tan, "\\ln": math.log,
              "\\sec": lambda t: 1 / math.cos(t), "\\csc": lambda t: 1 / math.sin(t),
              "\\cot": lambda t: 1 / math.tan(t), "\\exp": math.exp}
# what may follow a factor: an operator or a product without one (2\pi, 3\sqrt{2}, 2x)
_TERM_CONTINUES = ("*", "\\cdot", "\\times", "/", "\\div", "(", "{", "\\frac", "\\sqrt", "\\pi",
                   *_FUNCTIONS)
_MAX_DEPTH = 40            # nesting depth the parser accepts
_MAX_EXPONENT = 1000       # |exponent| it evaluates (2^{1000} is fine, 9^{9^9} is not)


def _to_number(s, variables=None):
    r"""Value of a simple expression (a Fraction when rational, else a float), or None.
    A recursive-descent parser, no eval():
        expr  := term (('+' | '-') term)*
        term  := unary (('*' | '/' | \cdot | \times | \div) unary | implicit product: 2\pi, 3x)*
        unary := ('-' | '+') unary | atom ('^' unary)?
        atom  := number | (expr) | {expr} | \frac{expr}{expr} | \sqrt{expr} | \sqrt[expr]{expr}
                 | \pi | \sin unary (also \cos ... \exp, and \sin^2 x) | a letter in `variables`
    """
    tokens, pos = _TOKEN_RE.findall(s) if len(s) <= 200 else [], 0
    variables = variables or {}

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take(expected=None):
        nonlocal pos
        if pos == len(tokens) or (expected is not None and tokens[pos] != expected):
            raise _NotANumber
        pos += 1
        return tokens[pos - 1]

    def expr(depth):
        if depth > _MAX_DEPTH:
            raise _NotANumber
        value = term(depth)
        while peek() in ("+", "-"):
            value += (1 if take() == "+" else -1) * term(depth)
        return value

    def term(depth):
        value = unary(depth)
        while peek() in _TERM_CONTINUES or peek() in variables:
            if peek() in ("/", "\\div"):
                take()
                value /= unary(depth)                      # ZeroDivisionError is caught below
            else:
                if peek() in ("*", "\\cdot", "\\times"):
                    take()
                value *= unary(depth)
        return value

    def unary(depth):
        if peek() in ("-", "+"):
            return (-1 if take() == "-" else 1) * unary(depth + 1)
        base = atom(depth)
        if peek() != "^":
            return base
        take("^")
        return _power(base, unary(depth + 1))

    def atom(depth, brace=False):
        tok = take("{" if brace else None)
        if tok[0].isdigit():
            return Fraction(tok)
        if tok in ("(", "{"):
            value = expr(depth + 1)
            take(")" if tok == "(" else "}")
            return value
        if tok == "\\frac":
            return atom(depth + 1, brace=True) / atom(depth + 1, brace=True)
        if tok == "\\sqrt":                                # \sqrt[3]{8} = 2
            n = Fraction(2)
            if peek() == "[":
                take("[")
                n = expr(depth + 1)
                take("]")
            return _power(atom(depth + 1, brace=True), 1 / n)
        if tok == "\\pi":
            return math.pi
        if tok in _FUNCTIONS:                              # \sin^2 x = (\sin x)^2
            exponent = None
            if peek() == "^":
                take("^")
                exponent = unary(depth + 1)
            value = _FUNCTIONS[tok](unary(depth + 1))
            return _power(value, exponent) if exponent is not None else value
        if tok in variables:
            return variables[tok]
        raise _NotANumber

    try:
        value = expr(0)
        return value if pos == len(tokens) and (
            isinstance(value, Fraction) or math.isfinite(value)) else None
    except (_NotANumber, ArithmeticError, ValueError, TypeError, RecursionError):
        return None


def _power(base, exponent):
    """base^exponent: exact when rational (8^{2/3} = 4, \\sqrt{1/4} = 1/2, \\sqrt[3]{-8} = -2),
    else a float; _NotANumber for 9^{9^9}, a complex root or a result over 100,000 bits."""
    if abs(exponent) > _MAX_EXPONENT:
        raise _NotANumber
    if isinstance(base, Fraction) and isinstance(exponent, Fraction) and exponent.denominator <= 64:
        p, q = exponent.numerator, exponent.denominator
        def root(n):                                   # r with r^q = n for an integer n >= 0
            r = n if q == 1 else math.isqrt(n) if q == 2 else round(n ** (1 / q))
            return next((c for c in (r - 1, r, r + 1) if c >= 0 and c ** q == n), None)
        num, den = root(abs(base.numerator)), root(base.denominator)
        if num is not None and den is not None and (base >= 0 or q % 2):
            if max(num.bit_length(), den.bit_length()) * abs(p) > 100_000:
                raise _NotANumber
            return (Fraction(num, den) if base >= 0 else -Fraction(num, den)) ** p
    if base < 0 and exponent != int(exponent):
        raise _NotANumber
    return float(base) ** float(exponent)                 # floats: overflow raises, never hangs


# The math-verify worker: math-verify's own timeouts use signals, which work only in a main thread,
# and a sympy call that never returns can only be stopped by killing its process. So it runs in a
# worker process, one request at a time; a late worker is killed and a spare takes over.
_WORKER_SCRIPT = r"""
import json, sys
out, sys.stdout = sys.stdout, sys.stderr       # only verdicts go to the parent
from math_verify import parse, verify
from sympy import Basic, Float, Rational, preorder_traversal

def approximates_an_irrational(answers):       # a decimal (a Float) with pi, sqrt(2), ...
    values = [a for a in answers if isinstance(a, Basic)]
    return any(a.has(Float) for a in values) and any(
        n.is_number and n.is_rational is not True and not n.has(Float)
        for a in values for n in preorder_traversal(a))

def exact(answers):                            # 3.14 -> 157/50
    return [a.xreplace({f: Rational(str(f)) for f in a.atoms(Float)}) if isinstance(a, Basic)
            else a for a in answers]

verify(parse("$x$"), parse("$x$"))            # warm up: a first call of each kind is slow, and
if sys.argv[1:] == ["spare"]:                 # a spare has the time to warm up on more kinds
    verify(parse("\\boxed{y = \\sum_{k=1}^{n} \\frac{\\sqrt{k}}{2} x^2}"),
           parse("\\boxed{y = \\sum_{k=1}^{n} \\frac{x^2 \\sqrt{k}}{2}}"))
print("ready", file=out, flush=True)
for line in sys.stdin:
    gold, pred = map(parse, json.loads(line))
    ok = verify(gold, pred)
    if ok and approximates_an_irrational(gold + pred):
        ok = verify(exact(gold), exact(pred))  # math-verify rounds: 3.1415927 is not pi
    print("yes" if ok else "no", file=out, flush=True)
"""


@dataclasses.dataclass
class _Worker:
    """A math-verify worker process and what has been read from it."""
    process: subprocess.Popen
    started: float                 # time.monotonic() at its start
    ready: bool = False            # it imported math-verify and said "ready"
    unread: bytes = b""            # what it wrote after its last complete line


@dataclasses.dataclass
class _WorkerPool:
    """The worker in use and a spare, shared by all threads under the lock."""
    workers: list = dataclasses.field(default_factory=list)
    failed_starts: int = 0         # workers that died or hung while starting; at 3, no math-verify
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


_pool = _WorkerPool()


def _math_verify(pred, gold, started, completion=False):
    """math-verify's verdict, or None when it has none by `started` + _CHECK_LIMIT_S (in any thread;
    waits for the lock and for a starting worker included). pred is an answer, or with
    completion=True a completion's end, which math-verify reads on its own."""
    deadline = started + _CHECK_LIMIT_S
    pred = pred[-2 * MAX_ANSWER_CHARS:] if completion else f"\\boxed{{{pred}}}"
    if (len(pred) > 2 * MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS
            or _pool.failed_starts >= 3
            or not _pool.lock.acquire(timeout=max(deadline - time.monotonic(), 0))):
        return None                                       # (or other threads took the time)
    worker = verdict = None
    try:
        _start_workers(1)
        worker = _pool.workers[0]
        worker.ready = worker.ready or _read_line(worker, deadline) == "ready"
        if not worker.ready:                              # still starting: no verdict this time
            if (worker.process.poll() is not None
                    or time.monotonic() - worker.started > _MV_START_LIMIT_S):
                _pool.failed_starts += 1
                _stop_workers([worker])
            return None
        worker.process.stdin.write((json.dumps([f"\\boxed{{{gold}}}", pred]) + "\n").encode())
        worker.process.stdin.flush()                      # gold first: the order matters
        verdict = _read_line(worker, deadline)
        _start_workers(2)                                 # a spare, once this one has answered
        return None if verdict is None else verdict == "yes"
    except Exception:                                      # e.g. a broken pipe
        return None
    finally:
        if worker is not None and worker.ready and verdict is None:
            _stop_workers([worker])                       # late, broken or interrupted: the spare
        _pool.lock.release()                              # takes over


def _read_line(worker, deadline):
    """The worker's next line by time.monotonic() `deadline`, else None (also when it died)."""
    while b"\n" not in worker.unread:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([worker.process.stdout], [], [], left)[0]:
            return None
        if not (chunk := os.read(worker.process.stdout.fileno(), 4096)):
            return None
        worker.unread += chunk
    line, _, worker.unread = worker.unread.partition(b"\n")
    return line.decode()


def _start_workers(count):
    """Keep `count` workers: drop dead ones, start new ones without waiting for them."""
    _stop_workers([w for w in _pool.workers if w.process.poll() is not None])
    while len(_pool.workers) < count:
        spare = ["spare"] if _pool.workers else []
        process = subprocess.Popen([sys.executable, "-c", _WORKER_SCRIPT, *spare],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
        _pool.workers.append(_Worker(process, time.monotonic()))


def _stop_workers(workers=None):
    """Kill these workers (default: all of them)."""
    for worker in list(_pool.workers if workers is None else workers):
        worker.process.kill()
        worker.process.wait()
        worker.process.stdin.close()
        worker.process.stdout.close()
        _pool.workers.remove(worker)


atexit.register(_stop_workers)


if __name__ == "__main__":   # below the checker, so that every name in the file is defined
    run_cli(lambda: train(parse_args()))
