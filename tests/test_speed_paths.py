"""The fast paths against the plain one they replace.

Rollouts: generate_completions' own loop (rl.decode_batch, the default: rows that have ended
leave the batch and the KV cache) and static_cache=True (transformers' static KV cache; on a GPU
its decoding step is also compiled, which no CPU test can check) against transformers' generate
with its default cache (use_generate=True): greedy completions identical, also with pad == eos
and for any batch size (evaluate.py's promise). Seeded samples: identical for the static cache
(the same sampler draws the same random numbers from the same logits); for the loop, the same
distribution (rl.next_token_probs against transformers' warpers), the very same draws while no
row of the batch has ended (batch size 1), and the same completions for the same seed.
Run: python -m pytest tests/test_speed_paths.py -q
"""
import copy
import functools

import pytest
import torch

import evaluate
import rl
from data import encode_prompt, load_qa, stop_token_ids
from eksft import load_model_and_tokenizer

QUESTIONS = ["1+1?", "What is 12 times 12?", "x", "Ava has 3 pens and buys 4 more. How many now?",
             "Solve 3y = 12 for y.", "abc", "Compute 7*8-5", "hi"]


@pytest.fixture(scope="module")
def chatty():
    """The tiny model with large random weights (completions differ from prompt to prompt) and a
    larger end-of-turn output row, so that greedy completions stop at different lengths and
    some do not stop at all within the budget. One torch thread (tiny ops: two threads wait)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer("tiny", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=generator)
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= 1.5
    prompts = [encode_prompt(tokenizer, q, system_prompt="") for q in QUESTIONS]
    yield model, tokenizer, prompts
    torch.set_num_threads(before)


def ids_of(results):
    return [r["completion_ids"] for r in results]


def test_static_cache_greedy_equals_the_default_cache(chatty):
    model, tok, prompts = chatty
    assert len({len(p) for p in prompts}) > 4                      # real left padding
    plain = rl.generate_completions(model, tok, prompts, max_new_tokens=24, static_cache=False)
    stopped = [r for r in plain if not r["truncated"]]
    assert stopped and len(stopped) < len(plain), "want completions that stop and ones that do not"
    assert len({tuple(r["completion_ids"]) for r in plain}) == len(plain)   # not trivially equal
    eos = stop_token_ids(model, tok)
    assert all(r["completion_ids"][-1] in eos for r in stopped)
    pad_is_eos = copy.deepcopy(tok)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    for tokenizer in (tok, pad_is_eos):
        for batch_size in (1, 3, 8):
            static = rl.generate_completions(model, tokenizer, prompts, max_new_tokens=24,
                                             batch_size=batch_size, static_cache=True)
            assert static == plain, (tokenizer.pad_token, batch_size)


def test_static_cache_sampling_equals_the_default_cache(chatty):
    """Seeded sampling, temperature and top-p as RL uses them: the very same completions."""
    model, tok, prompts = chatty
    for temperature, top_p in ((1.0, 1.0), (2.0, 0.9)):
        kw = dict(max_new_tokens=16, temperature=temperature, top_p=top_p, seed=7, batch_size=4)
        plain = rl.generate_completions(model, tok, prompts * 2, use_generate=True, **kw)
        static = rl.generate_completions(model, tok, prompts * 2, static_cache=True, **kw)
        assert static == plain
        other_seed = rl.generate_completions(model, tok, prompts * 2, static_cache=True,
                                             **{**kw, "seed": 8})
        assert ids_of(other_seed) != ids_of(plain)


def test_evaluate_greedy_does_not_depend_on_batch_size_with_static_cache(chatty, monkeypatch):
    """evaluate.py's promise, with its generation through the static cache (its default on CUDA)."""
    model, tok, _ = chatty
    monkeypatch.setattr(evaluate, "generate_completions",
                        functools.partial(rl.generate_completions, static_cache=True))
    problems = load_qa("synthetic", limit=5)
    by_size = {bs: evaluate.evaluate_model(model, tok, problems, max_new_tokens=12, batch_size=bs,
                                           progress=False)[0] for bs in (1, 2, 5)}
    texts = {bs: [r["completion"] for r in rows] for bs, rows in by_size.items()}
    assert len(set(texts[1])) == 5 and texts[1] == texts[2] == texts[5]


def test_static_cache_is_off_by_default_on_cpu(chatty, monkeypatch):
    """By default the loop runs (no generate call, a dynamic cache); generate on request."""
    model, tok, prompts = chatty
    seen = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw) or generate(**kw))
    rl.generate_completions(model, tok, prompts[:2], max_new_tokens=4)
    assert seen == []
    rl.generate_completions(model, tok, prompts[:2], max_new_tokens=4, use_generate=True)
    assert "cache_implementation" not in seen[0]
    rl.generate_completions(model, tok, prompts[:2], max_new_tokens=4, static_cache=True)
    assert seen[1]["cache_implementation"] == "static" and seen[1]["max_cache_len"] % 256 == 0


def test_loop_greedy_equals_generate(chatty):
    """The loop that drops ended rows writes what generate writes, token for token."""
    model, tok, prompts = chatty
    plain = rl.generate_completions(model, tok, prompts, max_new_tokens=24, use_generate=True)
    assert 0 < sum(r["truncated"] for r in plain) < len(plain)   # rows end at different steps
    pad_is_eos = copy.deepcopy(tok)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    for tokenizer in (tok, pad_is_eos):
        for batch_size in (1, 3, 8):
            loop = rl.generate_completions(model, tokenizer, prompts, max_new_tokens=24,
                                           batch_size=batch_size)
            assert loop == plain, (tokenizer.pad_token, batch_size)


def test_loop_drops_rows_that_have_ended(chatty):
    """Each forward pass runs only the rows still decoding: the batch shrinks as rows end."""
    model, tok, prompts = chatty
    widths = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        out = rl.generate_completions(model, tok, prompts, max_new_tokens=24)
    finally:
        hook.remove()
    assert widths[0] == len(prompts) and widths == sorted(widths, reverse=True)
    assert widths[-1] == sum(r["truncated"] for r in out) < len(prompts)
    assert len(widths) == max(len(r["completion_ids"]) for r in out)


def test_next_token_probs_equal_transformers_warpers():
    """The loop samples from the distribution generate samples from (temperature, then top-p)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :3] = 10.0                                   # ties at the top: the nucleus keeps them
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (2.0, 0.5), (0.5, 0.01)):
        warped = TemperatureLogitsWarper(temperature)(None, logits)
        if top_p < 1.0:
            warped = TopPLogitsWarper(top_p)(None, warped)
        assert torch.equal(rl.next_token_probs(logits, temperature, top_p), warped.softmax(-1))


def test_loop_sampling_is_generate_s_while_no_row_has_ended(chatty):
    """Batch size 1: nothing leaves a running batch, so the loop draws generate's random numbers
    and writes generate's samples. In larger batches the draws differ once a row has ended;
    the same seed still gives the same completions, another seed others."""
    model, tok, prompts = chatty
    for temperature, top_p in ((1.0, 1.0), (2.0, 0.9)):
        kw = dict(max_new_tokens=16, temperature=temperature, top_p=top_p, seed=7)
        plain = rl.generate_completions(model, tok, prompts, use_generate=True, batch_size=1, **kw)
        loop = rl.generate_completions(model, tok, prompts, batch_size=1, **kw)
        assert loop == plain
        runs = [rl.generate_completions(model, tok, prompts * 2, batch_size=4, **{**kw, "seed": s})
                for s in (7, 7, 8)]
        assert runs[0] == runs[1] and ids_of(runs[0]) != ids_of(runs[2])
