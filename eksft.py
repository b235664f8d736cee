"""
eksft.py: Entropy-KL Selective Fine-Tuning (EKSFT, arXiv 2605.29303): the loss, then the loop.

    python eksft.py --model tiny                       # offline sanity run on CPU, ~30 s
    python eksft.py --model Qwen2.5-0.5B               # EKSFT on openr1-3k, one GPU
    python eksft.py --model Qwen2.5-0.5B --method sft  # the plain SFT baseline, same loop
    python eksft.py --model Qwen2.5-0.5B --method dft  # DFT baseline: CE_t weighted by p(target)
    python eksft.py --model tiny --max-steps 0 --show-mask 2   # see which tokens are trained

EKSFT leaves out of the imitation loss the response tokens where the policy is most uncertain
(top ratio by entropy) or has drifted furthest from the frozen starting model (top ratio by
KL(policy || reference)), and adds a small entropy bonus and KL penalty on those tokens:

    loss = CE(kept tokens) - lambda_entropy * mean_E(H / log V) + lambda_kl * mean_K(KL)

The file reads in this order: the loss (a pure torch function to paste into any trainer), the
training step and loop, the command line, then an appendix of plumbing: models and tokenizers,
checkpoints and resume, Ctrl-C, the show-mask picture, the compiled loss kernels, the Trainer
adapter (transformers.Trainer / trl.SFTTrainer, for many GPUs).

Defects of the released trainer, fixed here:
  1. Alignment: entropy, KL and the mask all refer to the same (logit row, target token) pair as
     the cross-entropy. The released code masks the token before the uncertain prediction.
  2. The KL penalty is the real KL, sum p (log p - log q); the released code used p - log q.
  3. Two forward passes per step (policy with grad, reference without), not three: the selection
     statistics come from the detached logits of the grad pass.
  4. Statistics in row chunks (no full tokens x vocab fp32 copies); regularisers only on the
     selected rows.
  5. No "dynamic lambda" (it re-read the configured value every step: a constant +-5%).
  6. A token is selected by KL only when its KL is above --kl-threshold: at the first step the
     policy equals the reference, KL is 0 everywhere, and top-k by KL would pick arbitrary tokens.
  7. Normalisation over the whole optimizer step, so gradient accumulation does not change the
     result (the released CE is a per-micro-batch mean).
Simplifications:
  1. The CE sum is divided by the number of response tokens of the step (known before any forward
     pass, like Hugging Face's num_items_in_batch), not of kept tokens, which are only known after
     every micro-batch's forward pass; the regulariser sums by the number of selection slots,
     sum over sequences of floor(ratio * n). eksft_loss without normalisers uses per-batch means.
  2. One device; the Trainer adapter in the appendix runs the same loss on many GPUs.
  3. Examples longer than --max-len are dropped; fp32 master weights with bf16 autocast rather
     than pure bf16.
"""
import argparse
import copy
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from typing import NamedTuple

from tqdm import tqdm

from data import (CHATML_TEMPLATE, SFT_ALIASES, ArgumentParser, HelpFormatter, UserError,
                  build_sft_examples, collate, end_of_turn_ids, first_line, load_conversations,
                  require, run_cli, source_kind, step_batches)

# -----------------------------------------------------------------------------
# The loss: a pure function (torch only) to paste into any trainer
# Self-contained: copy from this banner to the next one; it needs only the imports below.
import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of a token that is not trained (PyTorch's and transformers' too)


def eksft_loss(logits, labels, ref_logits=None, *, ratio=0.2, combine="union",
               lambda_entropy=0.05, lambda_kl=0.05, scope="sequence",
               select_largest_entropy=True, select_largest_kl=True, kl_threshold=1e-3,
               entropy_threshold=None, dft=False, ignore_index=IGNORE_INDEX, chunk_size=1024,
               ce_normalizer=None, reg_normalizer=None, return_masks=False, compiled=None):
    """The EKSFT loss: returns (loss, stats), stats detached 0-dim tensors (ce, entropy, kl,
    masked fractions, iou, counts). logits, ref_logits: (B, T, V), any float dtype (statistics in
    fp32; ref_logits None when ratio == 0 == lambda_kl); labels: (B, T) unshifted.
      ratio, combine   k = floor(ratio * n) selected by entropy (E) and by KL (K); M = E union K
                       (the released recipe) or E intersection K
      scope            "sequence": k per sequence (released recipe); "batch": over this call
      kl_threshold     select by KL only where KL > kl_threshold; entropy_threshold likewise
                       (None: none; inf: E is empty); select_largest_*=False: the smallest
      dft              each kept CE_t weighted by its own p(target), detached (DFT, 2508.05629)
      ce_normalizer    divides the kept CE sum (None: the kept count here); reg_normalizer
                       divides the regulariser sums (None: |E| and |K| here)
      compiled         None: the chunk kernels below; or an object with .statistics and .gradient
                       of their signatures (eksft.COMPILED_KERNELS: through torch.compile)"""
    if combine not in ("union", "intersection") or scope not in ("sequence", "batch"):
        raise ValueError(f"combine must be union|intersection and scope sequence|batch, "
                         f"got {combine!r}, {scope!r}")
    if ref_logits is None and (ratio > 0 or lambda_kl != 0):
        raise ValueError("ref_logits is required when ratio > 0 or lambda_kl != 0")
    # the causal shift, once: logits[:, t] predicts labels[:, t+1]
    labels = labels.long()
    targets = labels[:, 1:]                                        # (B, T-1)
    response = targets != ignore_index                             # (B, T-1)
    n_response = response.sum()

    # 1. statistics (no gradient), one pass in row chunks: H_t, KL_t and the cross-entropy CE_t
    entropy, kl, token_ce = token_statistics(logits, labels, ref_logits, ignore_index, chunk_size,
                                             return_ce=True, compiled=compiled)   # each (B, T-1)

    # 2. selection: E = top-k by entropy, K = top-k by KL among tokens with KL > threshold
    if ratio > 0:
        above = response if entropy_threshold is None else response & (entropy > entropy_threshold)
        by_entropy = top_k_mask(entropy, response, ratio, scope, select_largest_entropy, above)
        by_kl = top_k_mask(kl, response, ratio, scope, select_largest_kl,
                           candidates=response & (kl > kl_threshold))
    else:
        by_entropy = by_kl = torch.zeros_like(response)
    masked = (by_entropy | by_kl) if combine == "union" else (by_entropy & by_kl)
    kept = response & ~masked                                      # (B, T-1)

    # 3. the loss, from the per-token statistics of step 1 (the CE needs no pass of its own):
    #    CE over the kept tokens, entropy bonus H_t / log V over E, KL penalty over K
    n_kept = int(kept.sum())
    # DFT: w_t = p(target) = exp(-CE_t), a constant (no gradient through it); otherwise w_t = 1
    weight = torch.exp(-token_ce) if dft else torch.ones_like(token_ce)    # (B, T-1)
    # F.nll_loss on one column only adds the kept w_t CE_t up, in the order F.cross_entropy does:
    # with ratio 0 (and no dft) the loss is F.cross_entropy's to the last bit
    ce_sum = F.nll_loss(-(weight * token_ce).reshape(-1, 1),
                        torch.where(kept, 0, ignore_index).flatten(),
                        ignore_index=ignore_index, reduction="sum")
    ce_norm = ce_normalizer if ce_normalizer is not None else max(n_kept, 1)
    ce = ce_sum / ce_norm                                          # sum_kept w_t CE_t / norm
    vocab_log = math.log(logits.shape[-1])                         # log V
    ent_reg = kl_reg = torch.zeros((), dtype=torch.float32, device=logits.device)
    ent_weight = kl_weight = 0.0                            # d loss / d H_t on E, d KL_t on K
    if by_entropy.any():  # the values are logged even when their lambda is 0
        norm = reg_normalizer if reg_normalizer is not None else int(by_entropy.sum())
        ent_reg = torch.where(by_entropy, entropy, 0.0).sum() / vocab_log / norm  # sum_E H/log V
        ent_weight = -lambda_entropy / vocab_log / norm
    if by_kl.any():
        norm = reg_normalizer if reg_normalizer is not None else int(by_kl.sum())
        kl_reg = torch.where(by_kl, kl, 0.0).sum() / norm                        # sum_K KL_t
        kl_weight = lambda_kl / norm
    loss = ce - lambda_entropy * ent_reg + lambda_kl * kl_reg

    # 4. its gradient: loss = sum_t a_t CE_t + b_t H_t + c_t KL_t, with these per-token weights
    #    (B, T-1); LossGradient (below) writes d loss / d logits out, chunk by chunk
    a = kept * weight / ce_norm                            # d loss / d CE_t = w_t / normaliser
    b, c = by_entropy * ent_weight, by_kl * kl_weight
    loss = LossGradient.apply(loss, logits, ref_logits, targets, a, b, c, entropy,
                              kl if kl is not None else torch.zeros_like(entropy), chunk_size,
                              compiled)

    n_e, n_k = by_entropy.sum(), by_kl.sum()
    n_both, n_either = (by_entropy & by_kl).sum(), (by_entropy | by_kl).sum()
    denom = n_response.clamp(min=1).float()
    stats = {"ce": ce.detach(), "ent_reg": ent_reg.detach(), "kl_reg": kl_reg.detach(),
             "entropy": entropy.sum() / denom, "kl": kl.sum() / denom if kl is not None
             else torch.tensor(float("nan")), "masked_frac": masked.sum() / denom,
             "masked_entropy_frac": n_e / denom, "masked_kl_frac": n_k / denom,
             "iou": n_both / n_either.clamp(min=1), "n_response": n_response,
             "n_kept": torch.tensor(n_kept), "n_masked": masked.sum(), "n_entropy": n_e,
             "n_kl": n_k, "n_both": n_both, "n_either": n_either}
    if return_masks:
        stats.update(by_entropy=by_entropy, by_kl=by_kl, token_entropy=entropy, token_kl=kl)
    return loss, stats


def token_statistics(logits, labels, ref_logits=None, ignore_index=IGNORE_INDEX, chunk_size=1024,
                     return_ce=False, compiled=None):
    """Per-token entropy and KL(policy || reference), and with return_ce the CE -log p(target),
    without gradient: each (B, T-1), aligned with the targets labels[:, 1:], 0 where ignored (kl
    None without ref_logits). logits, ref_logits: (B, T, V); labels: (B, T), unshifted. In fp32,
    chunk_size rows at a time: a few (chunk_size, V) fp32 temporaries whatever the length."""
    response = labels[:, 1:] != ignore_index                           # (B, T-1)
    targets = labels[:, 1:].clamp(0, logits.shape[-1] - 1)             # ignored: masked below
    statistics = compiled.statistics if compiled else chunk_statistics
    zeros = lambda: torch.zeros(response.shape, dtype=torch.float32, device=logits.device)
    entropy, ce, kl = zeros(), zeros(), zeros()                        # each (B, T-1)
    with torch.no_grad():
        for seq, start, stop in response_spans(response, chunk_size):
            rows = (seq, slice(start, stop))          # logits[seq, t] predicts labels[seq, t+1]
            ref = ref_logits[rows] if ref_logits is not None else None
            entropy[rows], ce[rows], kl_rows = statistics(logits[rows], targets[rows], ref)
            kl[rows] = kl_rows if ref is not None else 0.0
    entropy, ce = torch.where(response, entropy, 0.0), torch.where(response, ce, 0.0)
    kl = torch.where(response, kl, 0.0) if ref_logits is not None else None
    return (entropy, kl, ce) if return_ce else (entropy, kl)


def chunk_statistics(logits, targets, ref_logits=None):
    """H, CE and KL, each (C,), of C logit rows (C, V) with targets (C,) (KL None without ref)."""
    logp = finite(F.log_softmax(logits, -1, dtype=torch.float32))      # (C, V)
    p = logp.exp()
    entropy = -torch.einsum("cv,cv->c", p, logp)       # H_t = -sum_v p log p, no (C, V) product
    ce = -logp.gather(1, targets[:, None]).squeeze(1)                   # CE_t = -log p(target)
    if ref_logits is None:
        return entropy, ce, None
    logq = finite(F.log_softmax(ref_logits, -1, dtype=torch.float32))   # (C, V)
    # KL_t = sum_v p (log p - log q), one dot product over the difference (in place):
    # H_t minus a cross term, both ~log V, would lose ~3e-4 nats at V = 151,936
    return entropy, ce, torch.einsum("cv,cv->c", p, logq.neg_().add_(logp))


def top_k_mask(scores, response, ratio, scope="sequence", largest=True, candidates=None):
    """Boolean (B, T) mask of the top k = floor(ratio * n) positions by score, n the response
    positions of each sequence ("sequence") or of the batch ("batch"). Only candidates (default:
    the response) can be chosen, so fewer than k may be. Ties go to the earlier position."""
    candidates = response if candidates is None else candidates
    if scope == "batch":
        flat = top_k_mask(scores.reshape(1, -1), response.reshape(1, -1), ratio, "sequence",
                          largest, candidates.reshape(1, -1))
        return flat.reshape(scores.shape)
    k = num_slots(response.sum(1), ratio)                                 # (B,)
    ranked = scores.masked_fill(~candidates, float("-inf") if largest else float("inf"))
    order = ranked.argsort(dim=1, descending=largest, stable=True)        # (B, T) best first
    first_k = torch.arange(scores.shape[1], device=scores.device)[None, :] < k[:, None]  # (B, T)
    chosen = torch.zeros_like(candidates).scatter(1, order, first_k)      # chosen[i, order[i, j]]
    return chosen & candidates


def num_slots(n, ratio):
    """k = floor(ratio * n); the 1e-6 keeps 0.29 * 100 from flooring to 28 in floating point."""
    return torch.floor(ratio * n.double() + 1e-6).long()


def selection_slots(labels, ratio, scope="sequence", ignore_index=IGNORE_INDEX):
    """Number of selection slots k in a batch (the regulariser normaliser for accumulation):
    scope="sequence": sum over sequences of floor(ratio * n_response); "batch": floor(ratio * N)."""
    n = (labels[:, 1:] != ignore_index).sum(1)
    return int(num_slots(n.sum(0, keepdim=True) if scope == "batch" else n, ratio).sum())


class LossGradient(torch.autograd.Function):
    """The loss value with d loss / d logits attached: loss = sum_t a_t CE_t + b_t H_t + c_t KL_t
    (weights (B, T-1)) and, for a row z with p = softmax(z), q the reference's:
        dCE/dz = p - onehot(target),   dH/dz = -p (log p + H),   dKL/dz = p (log p - log q - KL)
    so  d loss/dz_t = p * (a - b H - c KL + (c - b) log p - c log q) - a onehot(target), computed
    chunk by chunk in backward (autograd would keep a (tokens x vocab) fp32 tensor alive)."""

    @staticmethod
    def forward(ctx, value, logits, ref_logits, targets, a, b, c, entropy, kl, chunk_size, kernels):
        ctx.save_for_backward(logits, ref_logits, targets, a, b, c, entropy, kl)  # no copies
        ctx.chunk_size, ctx.kernels = chunk_size, kernels
        return value.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, ref_logits, targets, a, b, c, entropy, kl = ctx.saved_tensors
        a, b, c = a * grad_loss, b * grad_loss, c * grad_loss           # (B, T-1)
        alpha, beta = a - b * entropy - c * kl, c - b                   # a - bH - cKL, c - b
        targets = targets.clamp(0, logits.shape[-1] - 1)
        gradient = ctx.kernels.gradient if ctx.kernels else chunk_gradient
        grad = torch.zeros_like(logits)            # rows without weight: prompt, padding, last
        use_ref = ref_logits is not None and bool((c != 0).any())       # any K row at all
        for seq, start, stop in response_spans((a != 0) | (b != 0) | (c != 0), ctx.chunk_size):
            rows = (seq, slice(start, stop))                            # C rows of sequence seq
            grad[rows] = gradient(logits[rows].detach(), targets[rows], a[rows], alpha[rows],
                                  beta[rows], c[rows], ref_logits[rows] if use_ref else None)
        return None, grad, None, None, None, None, None, None, None, None, None


def chunk_gradient(logits, targets, a, alpha, beta, c, ref_logits=None):
    """d loss / dz (C, V) of C logit rows, in their dtype: p * (alpha + beta log p - c log q)
    - a onehot(target), alpha = a - bH - cKL, beta = c - b; log q only on the K rows (c != 0)."""
    logp = finite(F.log_softmax(logits, -1, dtype=torch.float32))      # (C, V)
    coef = alpha[:, None]                                               # (C, 1): plain CE rows
    if ((beta != 0) | (c != 0)).any():                                  # rows in E or K
        coef = torch.addcmul(coef, beta[:, None], logp)                 # + (c - b) log p (C, V)
        k_rows = (c != 0).nonzero().squeeze(1)                          # (K,)
        if ref_logits is not None and k_rows.numel():
            logq = finite(F.log_softmax(ref_logits[k_rows], -1, dtype=torch.float32))  # (K, V)
            coef[k_rows] -= c[k_rows, None] * logq                      # - c log q
    grad = logp.exp_().mul_(coef)                                       # p * coef, in place
    grad.scatter_add_(1, targets[:, None], -a[:, None])                 # - a onehot(target)
    return grad.to(logits.dtype)


def finite(logp):
    """log p with -inf (a masked vocabulary entry) raised to the lowest float: p log p is 0."""
    return logp.clamp_(min=torch.finfo(logp.dtype).min)


def response_spans(rows, chunk_size):
    """(seq, start, stop): runs of at most chunk_size rows of sequence seq from its first to its
    last row marked in rows (B, T-1); rows in between (a user turn) are masked by the caller."""
    for seq in range(rows.shape[0]):
        marked = rows[seq].nonzero()
        if marked.numel():
            first, last = int(marked[0]), int(marked[-1])
            for start in range(first, last + 1, chunk_size):
                yield seq, start, min(start + chunk_size, last + 1)


# -----------------------------------------------------------------------------
# The training step and loop


def lr_at(step, total_steps, base_lr, warmup_frac, schedule="cosine"):
    """Linear warmup over ceil(warmup_frac * total) steps, then cosine decay to 0 (or constant).
    >>> [round(lr_at(step, 10, 1.0, 0.2), 3) for step in range(10)]
    [0.5, 1.0, 1.0, 0.962, 0.854, 0.691, 0.5, 0.309, 0.146, 0.038]"""
    warmup = math.ceil(warmup_frac * total_steps)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))    # cosine from 1 down to 0


def train_step(model, ref_model, step_examples, micro_batch_size, pad_id, loss_kwargs, device,
               amp_dtype):
    """Forward and backward over one optimizer step's examples, micro-batch by micro-batch; returns
    the step's statistics (a dict). The normalisers are counted over the whole step before any
    forward pass, so the summed gradient is the same however the step is split."""
    micro = [collate(step_examples[s: s + micro_batch_size], pad_id)
             for s in range(0, len(step_examples), micro_batch_size)]
    scope, ratio = loss_kwargs.get("scope", "sequence"), loss_kwargs["ratio"]
    ce_normalizer = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro)
    reg_normalizer = max(1, sum(selection_slots(mb["labels"], ratio, scope) for mb in micro))
    sums = {}
    autocast = lambda: torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None)
    for batch in micro:
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with autocast():
            logits = model(**inputs).logits                                     # (B, T, V)
        with torch.no_grad(), autocast():                                       # (B, T, V)
            ref_logits = ref_model(**inputs).logits if ref_model is not None else None
        loss, stats = eksft_loss(logits, batch["labels"], ref_logits, **loss_kwargs,
                                 ce_normalizer=ce_normalizer, reg_normalizer=reg_normalizer)
        loss.backward()
        add_micro_batch(sums, loss.detach(), stats, tokens=int(batch["attention_mask"].sum()))
    return step_metrics(sums)


def train(args):
    """Fine-tune with args (from parse_args); returns (model, tokenizer). Writes args.json,
    metrics.jsonl, checkpoint-N/ and the final model to args.output_dir."""
    run_args = vars(args).copy()
    set_seed(args.seed)
    check_names_and_paths(args)   # a typo fails in a second, before any model is loaded
    device, amp_dtype, why = pick_device(args.device, args.precision)
    print(f"device: {device} ({why})")
    resume_from = checkpoint_to_resume(args, run_args)                  # None: a fresh run
    model, tokenizer, ref_model = load_models(args, resume_from, device, amp_dtype)
    loss_kwargs = loss_options(args)
    print(f"model: {args.model}, {model.num_parameters() / 1e6:.2f}M parameters; method "
          f"{args.method} {loss_kwargs if ref_model is not None else '(no reference model)'}")

    # data: tokenised once; each epoch's steps are a seeded function of (seed, epoch)
    examples = build_sft_examples(tokenizer, load_conversations(args.data, seed=args.seed),
                                  args.max_len, args.num_samples, too_long=args.too_long)
    lengths = [len(e["input_ids"]) for e in examples]
    steps_per_epoch = len(step_batches(lengths, args.batch_size, args.seed))
    total_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    print(f"training: {total_steps} steps of {args.batch_size} sequences in micro-batches of "
          f"{args.micro_batch_size}, {steps_per_epoch} steps per epoch")

    # AdamW, betas (0.9, 0.95) as released; no weight decay on biases and norms (the usual practice)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    start_step = restore_checkpoint(resume_from, optimizer) if resume_from else 0
    metrics_path = start_run_files(args.output_dir, run_args, start_step)
    model.train()
    plan, plan_epoch, last = None, None, {}
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
               desc=args.method, dynamic_ncols=True)
    ctrl_c = StopOnCtrlC(args.output_dir)   # Ctrl-C: the step in progress ends with a checkpoint
    for step in ctrl_c.steps(bar):
        epoch = step // steps_per_epoch
        if plan_epoch != epoch:
            plan, plan_epoch = step_batches(lengths, args.batch_size, args.seed + epoch), epoch
        lr = lr_at(step, total_steps, args.lr, args.warmup, args.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        step_examples = [examples[i] for i in plan[step % steps_per_epoch]]
        stats = train_step(model, ref_model, step_examples, args.micro_batch_size,
                           tokenizer.pad_token_id, loss_kwargs, device, amp_dtype)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        last = {"step": step + 1, "epoch": epoch, **stats, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": stats["tokens"] / seconds, "step_s": seconds}
        last |= mfu(model, ref_model, device, stats["tokens"] / seconds)   # on known GPUs
        append_jsonl(metrics_path, last)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", masked=f"{stats['masked_frac']:.2f}")
        if (step + 1) % args.log_every == 0:
            tqdm.write(log_line(last))
        done = step + 1 == total_steps
        if done or ctrl_c.stop_here() or (args.save_every and (step + 1) % args.save_every == 0):
            save_checkpoint(args.output_dir, model, tokenizer, run_args,
                            {"step": step + 1, "epoch": epoch, "total_steps": total_steps},
                            optimizer)
            prune_checkpoints(args.output_dir, args.keep_checkpoints)
    bar.close()
    export_model(args.output_dir, model, tokenizer, run_args)
    if last:
        print(f"done: {last['step']} steps | loss {last['loss']:.4f} | ce {last['ce']:.4f} | "
              f"masked {last['masked_frac']:.3f} | {last['tokens_per_s']:.0f} tok/s | model in "
              f"{args.output_dir} (AutoModelForCausalLM.from_pretrained loads it)")
    if args.show_mask:
        show_mask_after_training(args, run_args, model, ref_model, tokenizer, examples, device,
                                 amp_dtype, trained=total_steps > 0 or bool(resume_from))
    return model, tokenizer


# -----------------------------------------------------------------------------
# The command line

TINY_DEFAULTS = dict(data="synthetic", lr=3e-3, batch_size=16, micro_batch_size=8, max_len=512,
                     num_samples=480, epochs=1, warmup=0.1)
HUB_DEFAULTS = dict(data="openr1-3k", lr=1e-5, batch_size=64, micro_batch_size=2, max_len=4096,
                    num_samples=3000, epochs=8, warmup=0.01)


def parse_args(argv=None):
    p = ArgumentParser(description="EKSFT (or plain SFT, or DFT) on a chat-format data set.",
                       formatter_class=HelpFormatter)
    add = p.add_argument
    add("--model", default="tiny", help="tiny | short name (Qwen2.5-0.5B) | hub id | local dir")
    add("--method", default="eksft", choices=["eksft", "sft", "dft"], help="sft: ratio 0, "
        "lambdas 0; dft: the same, each token's CE weighted by its detached p(target)")
    add("--data", default=None, help="openr1-3k | gsm8k | math500 | synthetic | hub dataset | "
        "local .jsonl/.json/.parquet (default: synthetic for tiny, openr1-3k otherwise)")
    add("--num-samples", type=int, default=None, help="keep this many examples that fit "
        "--max-len (default: 480 for tiny, 3000 otherwise)")
    add("--max-len", type=int, default=None, help="longest example in tokens (default: 512; "
        "4096 hub)")
    add("--too-long", default="drop", choices=["drop", "truncate"], help="an example over "
        "--max-len: drop it, or cut it there (the released recipe cuts at 20,000)")
    add("--output-dir", default=None, help="checkpoints, metrics.jsonl and the final model "
        "(default: runs/{method}-{model})")
    # EKSFT selection and regularisers
    add("--ratio", type=float, default=0.2, help="fraction selected by entropy and by KL")
    add("--combine", default="union", choices=["union", "intersection"], help="how E and K combine")
    add("--scope", default="sequence", choices=["sequence", "batch"], help="top-k per what")
    add("--lambda-entropy", type=float, default=0.05, help="weight of the entropy bonus on E")
    add("--lambda-kl", type=float, default=0.05, help="weight of the KL penalty on K")
    add("--kl-threshold", type=float, default=1e-3, help="select by KL only above this (nats)")
    add("--entropy-threshold", type=float, default=None, help="select by entropy only above this "
        "(nats; inf: no entropy selection, the KL-only ablation of tutorial/tiny_lab.py)")
    add("--ref-model", default=None, help="the frozen reference (default: the starting --model); "
        "with --max-steps 0 --show-mask, the model before fine-tuning shows the K tokens")
    # optimisation
    add("--lr", type=float, default=None, help="peak learning rate (default: 1e-5; 3e-3 for tiny)")
    add("--batch-size", type=int, default=None, help="sequences per step (default: 64; 16 tiny)")
    add("--micro-batch-size", type=int, default=None, help="sequences per forward pass; the rest "
        "is gradient accumulation (default: 2; 8 for tiny)")
    add("--epochs", type=int, default=None, help="passes over the data (default: 8; 1 for tiny)")
    add("--max-steps", type=int, default=None, help="stop after this many optimizer steps "
        "(default: all epochs; 0: train nothing, e.g. for --show-mask)")
    add("--schedule", default="cosine", choices=["cosine", "constant"], help="after warmup")
    add("--warmup", type=float, default=None, help="warmup fraction (default: 0.01; 0.1 tiny)")
    add("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    add("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    add("--compile-loss", action="store_true", help="run the loss's chunk kernels through "
        "torch.compile (the same values to fp32 rounding; see the appendix)")
    # run
    add("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    add("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="autocast or not")
    add("--seed", type=int, default=0, help="seed for weights of tiny, data order, sampling")
    add("--log-every", type=int, default=10, help="print a log line every N steps")
    add("--save-every", type=int, default=50, help="checkpoint every N steps (0: at the end only)")
    add("--keep-checkpoints", type=int, default=2, help="keep the N newest checkpoints (0: all)")
    add("--resume", action="store_true", help="continue from --output-dir's newest checkpoint")
    add("--allow-changed-args", action="store_true", help="--resume even where settings differ "
        "from the checkpoint's args.json (refused otherwise; the differences are named)")
    add("--show-mask", type=int, default=0, metavar="N", help="after training, print N examples "
        "with prompt, trained and masked tokens marked")
    args = p.parse_args(argv)
    # defaults that depend on the model: "tiny", or a directory trained from it, gets small ones
    args.model_kind = model_kind(args.model)
    for key, value in (TINY_DEFAULTS if args.model_kind == "tiny" else HUB_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    require(p, args, [
        ("ratio", 0 <= args.ratio <= 1, "between 0 and 1"), ("lr", args.lr > 0, "positive"),
        ("num_samples", args.num_samples >= 1, "at least 1"),
        ("max_len", args.max_len >= 2, "at least 2"),
        ("batch_size", args.batch_size >= 1, "at least 1"),
        ("micro_batch_size", args.micro_batch_size >= 1, "at least 1"),
        ("epochs", args.epochs >= 1, "at least 1"),
        ("max_steps", args.max_steps is None or args.max_steps >= 0, "0 or more"),
        ("warmup", 0 <= args.warmup <= 1, "between 0 and 1"),
        ("weight_decay", args.weight_decay >= 0, "0 or more"),
        ("grad_clip", args.grad_clip > 0, "positive"),
        ("log_every", args.log_every >= 1, "at least 1"),
        ("save_every", args.save_every >= 0, "0 or more"),
        ("keep_checkpoints", args.keep_checkpoints >= 0, "0 or more"),
        ("show_mask", args.show_mask >= 0, "0 or more"),
        ("ref_model", args.ref_model is None or args.method == "eksft",
         "used with --method eksft only")])
    if args.batch_size % args.micro_batch_size:
        p.error(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
                f"{args.micro_batch_size}")
    if args.output_dir is None:
        name = os.path.basename(args.model.rstrip("/"))
        args.output_dir = os.path.join("runs", f"{args.method}-{name}")
    return args


def loss_options(args):
    """eksft_loss keyword arguments from the command line. --method sft and dft turn selection
    and the regularisers off (ratio 0, lambdas 0); dft weights each token's CE by p(target)."""
    compiled = COMPILED_KERNELS if args.compile_loss else None
    if args.method in ("sft", "dft"):
        return dict(ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0, dft=args.method == "dft",
                    compiled=compiled)
    return dict(compiled=compiled, ratio=args.ratio, combine=args.combine,
                lambda_entropy=args.lambda_entropy, lambda_kl=args.lambda_kl, scope=args.scope,
                kl_threshold=args.kl_threshold, entropy_threshold=args.entropy_threshold)


def main(argv=None):
    """The command line: one `error:` line and exit code 2 for bad input (data.run_cli)."""
    run_cli(lambda: train(parse_args(argv)))


# -----------------------------------------------------------------------------
# Appendix A. Models and tokenizers: short names, the tiny offline model, device and precision

SHORT_NAMES = {f"Qwen2.5-{size}{kind}": f"Qwen/Qwen2.5-{size}{kind}"  # other names: used as given
               for size in ("0.5B", "1.5B", "3B", "7B", "Math-1.5B", "Math-7B")
               for kind in ("", "-Instruct")}


class ModelLoadError(UserError):
    """A model that cannot be found or loaded."""


def model_source(name):
    """The local directory or hub id that --model names ("tiny" is built in code), decided before
    any download: a typo is refused now rather than after a minute of hub retries."""
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ModelLoadError(f"{name}: no config.json, so no model in this directory (a run "
                                 f"that stopped early has its model in {name}/checkpoint-N)")
        return name
    parent = os.path.dirname(name.rstrip("/"))
    if name.startswith((".", "/", "~")) or (parent and os.path.isdir(parent)):
        raise ModelLoadError(f"{name}: no such model directory")
    if "/" not in name and name not in SHORT_NAMES:
        raise ModelLoadError(f"'{name}' is not a known short name ({', '.join(SHORT_NAMES)}), a "
                             f"local directory or a hub id (owner/name); offline, use --model tiny")
    return SHORT_NAMES.get(name, name)


def model_kind(name):
    """ "tiny" for the built-in model and for directories trained from it (their args.json says
    so), else "hub". It picks the defaults, so that runs/eksft-tiny works offline like tiny."""
    path = os.path.join(name, "args.json")
    if name == "tiny" or not os.path.isfile(path):
        return "tiny" if name == "tiny" else "hub"
    saved = read_json(path)
    return saved.get("model_kind") or ("tiny" if saved.get("model") == "tiny" else "hub")


def char_tokenizer():
    """A byte-level tokenizer with no merges (a token per ASCII character) and ChatML specials,
    built as a Qwen2Tokenizer so that a saved tiny model reloads with AutoTokenizer as exactly the
    same tokenizer (transformers 5 rebuilds any qwen2 tokenizer as Qwen2's byte-level pipeline)."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_symbol = bytes_to_unicode()  # byte -> printable symbol, as in every byte-level BPE
    vocab = {byte_symbol[b]: b for b in range(256)}
    specials = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    tokenizer = Qwen2Tokenizer(vocab=vocab | specials, merges=[], unk_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_model(tokenizer, seed=0, hidden_size=128, num_layers=4):
    """A ~1M-parameter Qwen2-architecture model with random weights (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=3 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def load_model_and_tokenizer(name, device, dtype=torch.float32, seed=0):
    """(model, tokenizer) from "tiny", a short name, a hub id or a local directory. Generation
    stops at the chat end-of-turn token as well as at eos (base Qwen models end chat turns with
    <|im_end|> but have eos = <|endoftext|>)."""
    if name == "tiny":
        tokenizer = char_tokenizer()
        model = tiny_model(tokenizer, seed=seed).to(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        source = model_source(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except Exception as e:  # offline, missing repo, bad directory: one line, not a traceback
            raise ModelLoadError(f"could not load model '{name}' ({source}): {type(e).__name__}: "
                                 f"{first_line(e).rstrip('.')}. Offline, use --model tiny or a "
                                 f"local model directory.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def load_models(args, resume_from, device, amp_dtype):
    """(model, tokenizer, ref_model): the policy (from resume_from when resuming) and for EKSFT
    the frozen reference, the starting weights (--ref-model, or --model when resuming)."""
    model, tokenizer = load_model_and_tokenizer(resume_from or args.model, device, seed=args.seed)
    ref_model = None
    if args.method == "eksft":
        start = args.ref_model or (args.model if resume_from else None)
        ref_model = (load_model_and_tokenizer(start, device, seed=args.seed)[0] if start
                     else copy.deepcopy(model))
        ref_model.to(amp_dtype or torch.float32).eval().requires_grad_(False)
        sizes = [m.get_input_embeddings().num_embeddings for m in (model, ref_model)]
        if sizes[0] != sizes[1]:
            raise UserError(f"--ref-model {start}: its vocabulary has {sizes[1]} entries, the "
                            f"model's {sizes[0]}; the reference must share the tokenizer")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tokenizer, ref_model


def pick_device(requested="auto", precision="auto"):
    """(device, autocast dtype or None, reason): cuda > mps > cpu; bf16 autocast where supported.
    A device this machine does not have is a UserError saying why."""
    visible = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if requested == "auto":
        device = torch.device(next((kind for kind, n in visible.items() if n), "cpu"))
        why = "no GPU found" if device.type == "cpu" else f"{device.type.upper()} is available"
    else:
        try:
            device, why = torch.device(requested), "asked for with --device"
        except RuntimeError:
            raise UserError(f"--device {requested}: not a device (use auto, cpu, cuda, cuda:N or "
                            f"mps)") from None
        count = visible.get(device.type, 1)                     # the cpu is always there
        if (device.index or 0) >= count:
            why = (f"{device.type.upper()} is not available" if count == 0
                   else f"this machine has {count} {device.type} device(s)")
            if device.type == "cuda" and torch.version.cuda is None:
                why += " (this torch is a CPU-only build)"
            raise UserError(f"--device {requested}: {why}; use --device cpu or auto")
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" or (precision == "auto" and bf16_ok):
        return device, torch.bfloat16, f"{why}; bf16 autocast (fp32 master weights)"
    used = "" if precision == "fp32" else " (bf16 autocast is used on GPUs that support it)"
    return device, None, f"{why}; fp32{used}"


PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12,
                   "3090": 71e12}  # dense bf16 FLOP/s, for MFU


def mfu(model, ref_model, device, tokens_per_s):
    """{"mfu": model FLOPs utilisation} on a GPU listed in PEAK_BF16_FLOPS, else {}: parameter
    FLOPs only (6N per trained token, + 2N for the reference), attention's own are left out."""
    peak = device.type == "cuda" and next((flops for name, flops in PEAK_BF16_FLOPS.items()
                                           if name in torch.cuda.get_device_name(device)), None)
    flops_per_token = (6 + (2 if ref_model is not None else 0)) * model.num_parameters()
    return {"mfu": flops_per_token * tokens_per_s / peak} if peak else {}


def log_line(row):
    """The printed line of one metrics.jsonl row."""
    return (f"step {row['step']:5d} | loss {row['loss']:.4f} | ce {row['ce']:.4f} | "
            f"H {row['entropy']:.3f} | KL {row['kl']:.4f} | masked {row['masked_frac']:.3f} "
            f"(E {row['masked_entropy_frac']:.3f}, K {row['masked_kl_frac']:.3f}, "
            f"iou {row['iou']:.2f}) | lr {row['lr']:.2e} | gnorm {row['grad_norm']:.2f} | "
            f"{row['tokens_per_s']:.0f} tok/s"
            + (f" | mfu {row['mfu']:.1%}" if "mfu" in row else ""))


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# Appendix B. Checkpoints, resume and metrics: written so that a crash never leaves a broken one


def check_names_and_paths(args):
    """Model names, the data source and --output-dir, checked before anything is loaded."""
    for name in (args.model, args.ref_model):
        if name and name != "tiny":
            model_source(name)
    source_kind(args.data, SFT_ALIASES)
    check_output_dir(args.output_dir)


def check_output_dir(path):
    """Fail in a second, before a model is loaded, if path cannot hold a run's files (nothing is
    created here: a run that fails later leaves no empty directory behind)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output-dir {path}: exists and is not a directory")
    parent = path
    while not os.path.exists(parent):          # the directory itself, or what would contain it
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent):
        raise UserError(f"--output-dir {path}: {parent} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):  # a read-only file system fails here, even root
            pass
    except OSError as e:
        raise UserError(f"--output-dir {path}: cannot write there ({e.strerror or e})") from None


def write_model_files(tmp, model, tokenizer, args, what, kept, state=None, optimizer=None):
    """model, tokenizer, args.json (and for a checkpoint trainer_state.json and the optimizer and
    RNG states, for an exact --resume) written to the fresh directory tmp; a failed write (a full
    disk) removes tmp: UserError "could not write {what} (why); {kept}"."""
    shutil.rmtree(tmp, ignore_errors=True)
    quiet_hub_progress()
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(os.path.join(tmp, "args.json"), args)
        if state is not None:
            write_json(os.path.join(tmp, "trainer_state.json"), state)
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                        "python_rng": random.getstate()}, os.path.join(tmp, "optimizer.pt"))
    except Exception as e:  # disk full, quota, permissions: torch and safetensors word it apart
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write {what} ({type(e).__name__}: {first_line(e)}); "
                        f"{kept}") from None


def save_checkpoint(output_dir, model, tokenizer, args, state, optimizer=None):
    """Write output_dir/checkpoint-{step} (returned) whole or absent (a temporary renamed)."""
    final = os.path.join(output_dir, f"checkpoint-{state['step']}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{state['step']}")
    kept = f"the checkpoints already in {output_dir} are kept, --resume continues from the newest"
    write_model_files(tmp, model, tokenizer, args, final, kept, state, optimizer)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # atomic on one filesystem: the checkpoint is whole or absent
    return final


def export_model(output_dir, model, tokenizer, args):
    """The final model at output_dir itself, so AutoModelForCausalLM.from_pretrained(output_dir)
    works: written to a temporary directory, then moved in one rename per file."""
    tmp = os.path.join(output_dir, ".tmp-export")
    write_model_files(tmp, model, tokenizer, args, f"the final model to {output_dir}",
                      "its newest checkpoint-N directory holds the same weights")
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.rmdir(tmp)


def quiet_hub_progress():
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Writing model shards" bars would break our tqdm line


def checkpoint_steps(output_dir):
    """The steps N of the checkpoint-N directories in output_dir, in increasing order."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = [name.removeprefix("checkpoint-") for name in names if name.startswith("checkpoint-")]
    return sorted(int(step) for step in steps if step.isdigit())


def latest_checkpoint(output_dir):
    """The checkpoint with the highest step in output_dir, or None (an unfinished one is .tmp-)."""
    steps = checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def prune_checkpoints(output_dir, keep):
    """Delete all but the keep newest checkpoints (keep 0: delete none)."""
    for step in checkpoint_steps(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}"), ignore_errors=True)


RESUME_MAY_CHANGE = {  # settings that may differ on --resume: they do not change what is computed
    "resume", "allow_changed_args", "output_dir", "device", "micro_batch_size",
    "gradient_checkpointing", "log_every", "save_every", "keep_checkpoints", "show_mask",
    "compile_loss", "static_cache"}


def check_resume_args(checkpoint, run_args, may_change=RESUME_MAY_CHANGE):
    """--resume with settings other than the checkpoint's would mix two runs without a word: name
    every difference (unless --allow-changed-args)."""
    saved = read_json(os.path.join(checkpoint, "args.json"))
    changed = [k for k in run_args
               if k in saved and k not in may_change and saved[k] != run_args[k]]
    if changed and not run_args.get("allow_changed_args"):
        raise UserError(f"--resume: {checkpoint} was run with other settings: " + ", ".join(
            f"--{k.replace('_', '-')} {saved[k]} (now {run_args[k]})" for k in changed)
            + "; give the same ones, or add --allow-changed-args to continue with the new ones")
    return changed


def checkpoint_to_resume(args, run_args):
    """With --resume, the newest checkpoint in --output-dir (its settings checked), else None."""
    checkpoint = latest_checkpoint(args.output_dir) if args.resume else None
    if checkpoint:
        check_resume_args(checkpoint, run_args)
    elif args.resume:
        print(f"resume: no checkpoint in {args.output_dir}, starting fresh")
    return checkpoint


def restore_checkpoint(checkpoint, optimizer):
    """The optimizer and RNG states saved in checkpoint; returns the step to continue from."""
    step = read_json(os.path.join(checkpoint, "trainer_state.json"))["step"]
    saved = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])
    print(f"resume: from {checkpoint} at step {step}")
    return step


def start_run_files(output_dir, run_args, start_step):
    """Creates output_dir with args.json; returns metrics.jsonl's path, cut to the steps before."""
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "args.json"), run_args)
    path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [l for l in f if l.strip() and json.loads(l)["step"] <= start_step]
        with open(path, "w") as f:
            f.writelines(rows)
    return path


def add_micro_batch(sums, loss, stats, tokens):
    """Adds a micro-batch's loss, token count and eksft_loss stats to the step's sums. loss, ce and
    the regularisers are already its share of the step's; token means are weighted by n_response."""
    n = stats["n_response"]
    values = {key: stats[key] for key in ("ce", "ent_reg", "kl_reg", "n_response", "n_masked",
                                          "n_entropy", "n_kl", "n_both", "n_either")}
    values |= {"loss": loss, "tokens": tokens, "entropy": stats["entropy"] * n,
               "kl": stats["kl"] * n}
    for key, value in values.items():   # tensors to Python numbers (the counts stay int)
        sums[key] = sums.get(key, 0) + (value.item() if torch.is_tensor(value) else value)


def step_metrics(sums):
    """A step's metrics (a metrics.jsonl row's fields) from its sums: token means over the step."""
    n = max(sums["n_response"], 1)
    return {**{key: sums[key] for key in ("loss", "ce", "ent_reg", "kl_reg")},
            "entropy": sums["entropy"] / n, "kl": sums["kl"] / n,
            "masked_frac": sums["n_masked"] / n,
            "masked_entropy_frac": sums["n_entropy"] / n, "masked_kl_frac": sums["n_kl"] / n,
            "iou": sums["n_both"] / max(sums["n_either"], 1), "tokens": sums["tokens"],
            "response_tokens": sums["n_response"]}


def read_json(path):
    """The JSON value in path; a file that cannot be read or parsed is a UserError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it ({type(e).__name__}: {first_line(e)})") from None


def write_json(path, obj):
    """path written whole or not at all (a temporary file renamed); a failed write: UserError."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); the file is as it "
                        f"was") from None


def append_jsonl(path, record):
    """One JSON line per record; NaN and inf become null so every JSON reader loads the file."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in record.items()}
    try:
        with open(path, "a") as f:
            f.write(json.dumps(clean) + "\n")
    except OSError as e:  # a full disk: the lines written before stay
        raise UserError(f"could not write {path} ({e.strerror or e}); the lines before are "
                        f"kept") from None


# -----------------------------------------------------------------------------
# Appendix C. Ctrl-C: finish the step, save a checkpoint, stop


class StopOnCtrlC:
    """Ctrl-C in a training loop (`for step in ctrl_c.steps(...)`). The first one only sets a
    flag: the step in progress finishes, the loop's save check (stop_here) writes a checkpoint,
    and the loop ends with KeyboardInterrupt saying where (a step cut short inside optimizer.step()
    would leave the weights half updated). A second Ctrl-C stops at once."""

    def __init__(self, output_dir):
        self.output_dir, self.asked, self.stopping = output_dir, False, False

    def handler(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt(f"interrupted; continue from the newest checkpoint in "
                                    f"{self.output_dir} with --resume")
        self.asked = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop "
              "now)", file=sys.stderr, flush=True)

    def stop_here(self):
        """At the step's save check: True once Ctrl-C was pressed (save, then the loop stops)."""
        self.stopping = self.asked
        return self.stopping

    def steps(self, steps):
        """The loop's steps with this Ctrl-C handler; the previous handler is back when it ends."""
        try:
            previous = signal.signal(signal.SIGINT, self.handler)
        except ValueError:  # not the main thread: Ctrl-C stays as it is
            yield from steps
            return
        try:
            for step in steps:
                if self.stopping:  # the step before saved checkpoint-{step} and was not the last
                    path = os.path.join(self.output_dir, f"checkpoint-{step}")
                    raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved to "
                                            f"{path}; continue with --resume")
                yield step
        finally:
            signal.signal(signal.SIGINT, previous)


# -----------------------------------------------------------------------------
# Appendix D. Seeing the method: which tokens are prompt, trained, or masked by entropy / KL / both

MARKS = {  # kind -> (its ANSI colour, or with color=False the marks around it)
    "prompt": ("\033[2m", "<<", ">>"), "trained": ("\033[32m", "", ""),
    "entropy": ("\033[33m", "[E:", "]"), "kl": ("\033[35m", "[K:", "]"),
    "both": ("\033[31;1m", "[EK:", "]")}


def render_tokens(tokenizer, ids, labels, by_entropy=None, by_kl=None, color=True):
    """One example as text, each run of tokens marked as prompt, trained, or masked (by_entropy,
    by_kl: booleans aligned with ids); color=False marks with <<prompt>>, [E:..], [K:..], [EK:..].
    A character whose bytes span two runs (in byte-level BPE) is shown whole in the run holding
    its last byte, so the marks removed give back tokenizer.decode(ids)."""
    def kind(j):
        if labels[j] == IGNORE_INDEX:
            return "prompt"
        e, k = by_entropy is not None and by_entropy[j], by_kl is not None and by_kl[j]
        return "both" if e and k else "entropy" if e else "kl" if k else "trained"
    out, j, shown = [], 0, 0          # shown: characters of the decoded text already printed
    while j < len(ids):
        this = kind(j)
        while j < len(ids) and kind(j) == this:
            j += 1
        upto = tokenizer.decode(ids[:j])
        if j < len(ids):              # a character cut at j is completed by the next run
            upto = upto.rstrip("\ufffd")
        text, shown = upto[shown:], max(shown, len(upto))
        if text:                      # empty: the run held only the first bytes of a character
            colour, before, after = MARKS[this]
            out.append(colour + text + "\033[0m" if color else before + text + after)
    return "".join(out)


def show_masks(model, ref_model, tokenizer, examples, loss_kwargs, device, amp_dtype, color=True):
    """Print examples with the tokens EKSFT drops under the current policy and reference."""
    legend = (" ".join(MARKS[k][0] + k + "\033[0m" for k in MARKS) if color else
              "<<prompt>> trained [E:masked by entropy] [K:masked by KL] [EK:by both]")
    print(f"legend: {legend}")
    for example in examples:
        batch = {k: v.to(device) for k, v in collate([example], tokenizer.pad_token_id).items()}
        with torch.no_grad(), torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
            logits = model(input_ids=batch["input_ids"]).logits
            ref = ref_model(input_ids=batch["input_ids"]).logits if ref_model is not None else None
        _, stats = eksft_loss(logits, batch["labels"], ref, return_masks=True, **loss_kwargs)
        # the masks refer to targets labels[:, 1:]; shift them back onto the token ids
        by_e, by_k = ([False] + stats[key][0].tolist() for key in ("by_entropy", "by_kl"))
        print(render_tokens(tokenizer, example["input_ids"], example["labels"], by_e, by_k, color)
              + "\n")


def show_mask_after_training(args, run_args, model, ref_model, tokenizer, examples, device,
                             amp_dtype, trained):
    """--show-mask N: the first N examples as EKSFT with this run's settings would mask them (for
    --method sft or dft too), against the reference (a copy of the model when there is none)."""
    if not trained and not args.ref_model:
        print("note: no step was trained and the reference is this same model, so KL is 0 and no "
              "token is marked K; add --ref-model (e.g. the model before fine-tuning) to see them")
    options = loss_options(argparse.Namespace(**{**run_args, "method": "eksft"}))
    show_masks(model, ref_model if ref_model is not None else copy.deepcopy(model).eval(),
               tokenizer, examples[: args.show_mask], options, device, amp_dtype,
               color=sys.stdout.isatty() and not os.environ.get("NO_COLOR"))


# -----------------------------------------------------------------------------
# Appendix E. The compiled loss: the chunk kernels as torch.compile fuses them (--compile-loss)


def fused_statistics(logits, targets, ref_logits=None):
    """chunk_statistics (H, CE and KL of C rows; KL None without ref_logits) as whole-row
    reductions without in-place updates, which torch.compile fuses into a pass or two per row
    instead of a kernel and an fp32 (C, V) temporary per operation."""
    logp = finite(F.log_softmax(logits, -1, dtype=torch.float32))       # (C, V)
    p_logp = (logp.exp() * logp).sum(-1)                                # (C,) sum_v p log p
    ce = -logp.gather(1, targets[:, None]).squeeze(1)                   # (C,) -log p(target)
    if ref_logits is None:
        return -p_logp, ce, None
    logq = finite(F.log_softmax(ref_logits, -1, dtype=torch.float32))   # (C, V)
    return -p_logp, ce, (logp.exp() * (logp - logq)).sum(-1)           # KL = sum p (log p - log q)


def fused_gradient(logits, targets, a, alpha, beta, c, ref_logits=None):
    """chunk_gradient on every row at once, without data-dependent branches: d loss / dz (C, V)
    = p * (alpha + beta log p - c log q) - a onehot(target), in the logits' dtype. Without
    ref_logits every c is 0, and the c log q term is left out."""
    logp = finite(F.log_softmax(logits, -1, dtype=torch.float32))       # (C, V)
    coef = alpha[:, None] + beta[:, None] * logp                        # (C, V)
    if ref_logits is not None:
        coef = coef - c[:, None] * finite(F.log_softmax(ref_logits, -1, dtype=torch.float32))
    vocab = torch.arange(logits.shape[-1], device=logits.device)        # (V,)
    onehot_a = torch.where(vocab == targets[:, None], a[:, None], 0.0)  # (C, V) a onehot(target)
    return (logp.exp() * coef - onehot_a).to(logits.dtype)


_COMPILED = {}  # kernel -> torch.compile(kernel), or the kernel itself where compiling failed


def run_compiled(kernel, *args):
    """kernel(*args) through torch.compile, built on first use with dynamic shapes (chunks of any
    length share it). Where compiling fails (no triton or C++ compiler here), says so once and runs
    the kernel uncompiled from then on: same values, slower."""
    if kernel not in _COMPILED:
        _COMPILED[kernel] = torch.compile(kernel, dynamic=True)
    try:
        return _COMPILED[kernel](*args)
    except Exception as e:
        if _COMPILED[kernel] is kernel:  # the kernel itself failed: a real error
            raise
        print(f"warning: torch.compile failed for {kernel.__name__} ({type(e).__name__}: "
              f"{str(e).strip()[:200]}); running it uncompiled")
        _COMPILED[kernel] = kernel
        return kernel(*args)


class ChunkKernels(NamedTuple):
    statistics: object   # like chunk_statistics(logits, targets, ref_logits=None)
    gradient: object     # like chunk_gradient(logits, targets, a, alpha, beta, c, ref_logits=None)


# eksft_loss(..., compiled=COMPILED_KERNELS): the same values to fp32 rounding (tested on CPU)
COMPILED_KERNELS = ChunkKernels(statistics=lambda *args: run_compiled(fused_statistics, *args),
                                gradient=lambda *args: run_compiled(fused_gradient, *args))


# -----------------------------------------------------------------------------
# Appendix F. The Trainer adapter: the same loss in transformers.Trainer / trl.SFTTrainer
# (accelerate, DeepSpeed, FSDP: many GPUs)


def eksft_trainer_class(base):
    """A subclass of `base` (transformers.Trainer, trl.SFTTrainer, ...) that trains with eksft_loss.

        EKSFTTrainer = eksft_trainer_class(transformers.Trainer)
        trainer = EKSFTTrainer(model=model, args=training_args, train_dataset=ds,
                               data_collator=..., eksft_options=dict(ratio=0.2))
        trainer.train()      # or: accelerate launch --config_file ds_zero3.yaml my_script.py

    eksft_options: eksft_loss's keyword arguments. The frozen reference (a copy of the model, or
    `ref_model`) is placed like the model: on its device and precision, or by DeepSpeed/FSDP.
    Gradient accumulation: the Trainer counts the response tokens of the accumulated batch
    (num_items_in_batch) and this class counts its selection slots, both over all processes, so
    the result equals eksft.py's own loop."""

    class EKSFTTrainer(base):
        def __init__(self, *args, ref_model=None, eksft_options=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.eksft_options = {"ratio": 0.2, **(eksft_options or {})}
            self._slots = None
            self._sums = {}  # the statistics' sums since the last log line, as eksft.py's loop's
            options = self.eksft_options
            needs_ref = options["ratio"] > 0 or options.get("lambda_kl", 0.05) != 0
            if needs_ref and ref_model is None:
                ref_model = copy.deepcopy(self.accelerator.unwrap_model(self.model))
            self.ref_model = self._place_reference(ref_model) if needs_ref else None

        def _place_reference(self, ref):
            ref = ref.eval().requires_grad_(False)
            if self.is_deepspeed_enabled:  # ZeRO-3 shards weights: the reference gets an engine
                import deepspeed
                config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
                config.pop("optimizer", None), config.pop("scheduler", None)
                if config.get("zero_optimization", {}).get("stage") != 3:
                    config["zero_optimization"] = {"stage": 0}
                return deepspeed.initialize(model=ref, config=config)[0].eval()
            if self.is_fsdp_enabled:
                return self.accelerator.prepare_model(ref, evaluation_mode=True)
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
            return ref.to(device=self.args.device, dtype=dtype)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            ratio, scope = self.eksft_options["ratio"], self.eksft_options.get("scope", "sequence")
            slots = torch.tensor(sum(selection_slots(b["labels"], ratio, scope) for b in batches
                                     if "labels" in b), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                slots = self.accelerator.gather(slots).sum()
            self._slots = slots.clamp(min=1)
            return batches, num_items

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            for key in ("completion_mask", "assistant_masks"):  # TRL collators' extra fields
                inputs.pop(key, None)
            outputs = model(**inputs)
            ref_logits = None
            if self.ref_model is not None:
                with torch.no_grad():
                    ref_logits = self.ref_model(**inputs).logits
            accumulated = model.training and num_items_in_batch is not None
            loss, stats = eksft_loss(outputs.logits, labels, ref_logits, **self.eksft_options,
                                     ce_normalizer=num_items_in_batch if accumulated else None,
                                     reg_normalizer=self._slots if accumulated else None)
            if accumulated and self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages gradients; the counts were global
            if model.training:  # summed, so the logged means cover every micro-batch
                add_micro_batch(self._sums, loss.detach(), stats, tokens=0)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if self._sums and "loss" in logs:  # every process logs at this step
                sums = self._sums
                if self.args.world_size > 1:  # and every process's micro-batches are summed
                    values = torch.tensor(list(sums.values()), dtype=torch.float64,
                                          device=self.args.device)
                    values = self.accelerator.reduce(values, reduction="sum")
                    sums = dict(zip(sums, values.tolist()))
                step = step_metrics(sums)
                keys = ["masked_frac", "entropy"]
                keys += ["kl", "iou"] if self.ref_model is not None else []
                logs = {**logs, **{f"eksft/{key}": step[key] for key in keys}}
                self._sums = {}
            return super().log(logs, *args, **kwargs)

    EKSFTTrainer.__name__ = EKSFTTrainer.__qualname__ = f"EKSFT{base.__name__}"
    return EKSFTTrainer


if __name__ == "__main__":
    main()
