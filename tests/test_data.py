"""data.py: formats, the label mask, bad-input messages, batching, synthetic problems."""
import doctest
import os
import json
import re

import pytest

import data
from data import IGNORE_INDEX, DataError
from eksft import char_tokenizer

TOKENIZER = char_tokenizer()
SYS = {"role": "system", "content": data.SYSTEM_PROMPT}


def trained_text(ids, labels):
    """Decode the trained runs of an example, each run on its own line."""
    runs, current = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == i, "a label must equal the token it sits on (unshifted labels)"
            current.append(i)
        elif current:
            runs.append(TOKENIZER.decode(current))
            current = []
    if current:
        runs.append(TOKENIZER.decode(current))
    return runs


def test_labels_cover_exactly_the_assistant_turns_and_their_end_token():
    messages = [SYS, {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "and 2+2?"},
                {"role": "assistant", "content": "It is 4."}]
    ids, labels = data.encode_conversation(TOKENIZER, messages)
    assert trained_text(ids, labels) == ["2<|im_end|>", "It is 4.<|im_end|>"]
    # and the ids are exactly the chat template's rendering, tokenised once
    assert TOKENIZER.decode(ids) == TOKENIZER.apply_chat_template(messages, tokenize=False)


def test_a_tokenizer_without_chat_template_gets_chatml():
    tok = char_tokenizer()
    tok.chat_template = None
    ids, labels = data.encode_conversation(tok, [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}])
    assert tok.decode(ids) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    trained = [tok.decode([i]) for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert trained == ["a", "<|im_end|>"]


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    {"conversations": [{"role": "user", "value": "Q"}, {"role": "assistant", "value": "A"}]},
    {"problem": "Q", "solution": "A"},
    {"question": "Q", "answer": "A"},
])
def test_every_row_format_gives_the_same_conversation(row):
    expected = [SYS, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert data.row_to_messages(row, "f, row 1") == expected


def test_an_existing_system_turn_is_kept():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"}]}
    assert data.row_to_messages(row, "f")[0] == {"role": "system", "content": "S"}


# -----------------------------------------------------------------------------
# --system-prompt '': no system turn, also where the chat template writes a default one

# SmolLM2-135M-Instruct's chat template, as its tokenizer_config.json has it
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN25_TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "shared", "fixtures", "qwen2.5_chat_template.jinja")
SMOLLM2_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN25_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def tokenizer_with(template):
    tok = char_tokenizer()
    tok.chat_template = template
    return tok


def qwen25_template():
    if not os.path.exists(QWEN25_TEMPLATE):
        pytest.skip(f"Qwen2.5's chat template fixture is not at {QWEN25_TEMPLATE}")
    with open(QWEN25_TEMPLATE, encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("template,default", [(SMOLLM2_TEMPLATE, SMOLLM2_DEFAULT),
                                              ("qwen2.5", QWEN25_DEFAULT),
                                              (data.CHATML_TEMPLATE, None)])
def test_an_empty_system_prompt_is_no_system_turn(template, default):
    """'' renders no system turn at all; None leaves the template's default (as before); the
    project's prompt is the project's. Exact strings, for each template."""
    tok = tokenizer_with(qwen25_template() if template == "qwen2.5" else template)
    turn = lambda role, text: f"<|im_start|>{role}\n{text}<|im_end|>\n"
    user, assistant = turn("user", "What is 2+3?"), "<|im_start|>assistant\n"
    prompt = lambda system: data.render(tok, data.prompt_messages("What is 2+3?", system),
                                        add_generation_prompt=True)
    assert prompt("") == user + assistant
    assert prompt(None) == (turn("system", default) if default else "") + user + assistant
    assert prompt(data.SYSTEM_PROMPT) == turn("system", data.SYSTEM_PROMPT) + user + assistant
    assert tok.decode(data.encode_prompt(tok, "What is 2+3?", "")) == user + assistant
    # SFT data alike: no system turn, and the labels still cover the answer and its end
    messages = data.row_to_messages({"question": "What is 2+3?", "answer": "5"}, "f", "")
    ids, labels = data.encode_conversation(tok, messages)
    assert tok.decode(ids) == user + turn("assistant", "5")
    assert trained_text(ids, labels) == ["5<|im_end|>"]
    conversation = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert data.render(tok, data.row_to_messages({"messages": conversation}, "f", None)) == (
        (turn("system", default) if default else "") + turn("user", "Q") + turn("assistant", "A"))


GOOD = '{"question": "q", "answer": "a"}\n'
BAD_ROWS = [  # (file content, message fragment); the bad row is always the second line
    (GOOD + '{"question": "q"\n', "row 2: not valid JSON"),
    (GOOD + '{"text": "no known fields"}\n', "row 2: expected 'messages'"),
    (GOOD + '{"problem": "q", "solution": "  "}\n', "row 2: turn 2 is an empty assistant turn"),
    (GOOD + '{"question": "q", "answer": 7}\n', "row 2: turn 2 (assistant) content is int"),
    (GOOD + '{"messages": [{"role": "robot", "content": "x"}]}\n',
     "row 2: turn 1 has unknown role 'robot'"),
    (GOOD + '{"messages": [{"role": "user", "content": "x"}]}\n', "row 2: no assistant turn"),
    (GOOD + '[1, 2]\n', "row 2: expected a JSON object"),
    (GOOD + '{"messages": []}\n', "row 2: 'messages' must be a non-empty list"),
]


@pytest.mark.parametrize("content,fragment", BAD_ROWS)
def test_bad_rows_name_the_file_the_row_and_the_problem(tmp_path, content, fragment):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        data.load_conversations(str(path))
    assert str(path) in str(e.value) and fragment in str(e.value), str(e.value)


def test_bad_files(tmp_path):
    (tmp_path / "x.json").write_text('{"not": "a list"}')   # JSON Lines of one row
    (tmp_path / "y.json").write_text('[{"question": "q", "answer": "a"},')
    (tmp_path / "z.txt").write_text("hello")
    for name, fragment in [("x.json", "x.json, row 1: expected 'messages'"),
                           ("y.json", "y.json: not valid JSON (line 1: Expecting value)"),
                           ("missing.jsonl", "no such file")]:
        with pytest.raises(DataError, match=re.escape(fragment)):
            data.load_conversations(str(tmp_path / name))
    with pytest.raises(DataError, match="unknown file type"):
        data.read_local_rows(str(tmp_path / "z.txt"))


def test_json_rows_are_numbered_from_one(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"question": "q", "answer": "a"}, {"question": "q"}]))
    with pytest.raises(DataError, match=r"d\.json, row 2"):
        data.load_conversations(str(path))


def test_qa_rows_need_question_and_answer(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": 3}\n\n{"question": "q2"}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl, row 3: missing field 'answer'"):
        data.load_qa(str(path))
    path.write_text('{"question": "q", "answer": 3}\n')
    assert data.load_qa(str(path)) == [{"question": "q", "answer": "3"}]
    with pytest.raises(data.UserError, match="unknown question/answer set"):
        data.load_qa("no-such-benchmark")


def test_too_long_examples_are_dropped_and_counted():
    convs = [(f"r{i}", [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "x" * n}])
             for i, n in enumerate([5, 500, 10])]
    lines = []
    examples = data.build_sft_examples(TOKENIZER, convs, max_len=100, log=lines.append)
    assert [e["input_ids"].count(TOKENIZER.convert_tokens_to_ids("x")) for e in examples] == [5, 10]
    assert "1 dropped" in lines[0]


def solve_by_reading(question):
    """An independent solver for the synthetic problems: re-reads the story sentence by sentence."""
    total = int(re.search(r"has (\d+)", question).group(1))
    for sentence in question.split(". "):
        if m := re.search(r"buys (\d+) more", sentence):
            total += int(m.group(1))
        elif m := re.search(r"gives away (\d+)", sentence):
            total -= int(m.group(1))
        elif "doubles" in sentence:
            total *= 2
    return total


def test_synthetic_problems_are_seeded_and_correct():
    rows = data.synthetic_problems(200, seed=3)
    assert rows == data.synthetic_problems(200, seed=3)
    assert rows != data.synthetic_problems(200, seed=4)
    for r in rows:
        assert int(r["answer"]) == solve_by_reading(r["question"]) >= 0
        assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}.")
    # the held-out and training question sets do not share a generator seed
    held_out = {r["question"] for r in data.load_qa("synthetic", limit=200)}
    train = {r["question"] for r in data.load_qa("synthetic-train", limit=200)}
    assert len(held_out & train) < 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_held_out_shares_no_question_with_any_training_pool(seed):
    """Whatever the seed, and at every size the scripts use: eksft.py's SFT pool (2,000 rows),
    rl.py's training and held-out questions (--eval-size 16 for tiny, 200, or all), evaluate.py's
    held-out set (seed 0, any --limit)."""
    questions = lambda rows: {r.get("question") or r["messages"][-2]["content"] for r in rows}
    sft = questions({"messages": m} for _, m in data.load_conversations("synthetic", seed=seed))
    rl_train = questions(data.load_qa("synthetic-train", seed=seed))
    assert len(rl_train) > 490 and len(sft) > 1980 and rl_train <= sft   # RL's are SFT's first 500
    evaluated = questions(data.load_qa("synthetic", limit=10 ** 6))     # all 500, whatever --limit
    assert len(data.load_qa("synthetic", limit=10 ** 6)) == data.SYNTHETIC_HELD_OUT == 500
    for eval_size in (16, 200, 500):
        train, held_out = data.train_eval_sets("synthetic", eval_size, seed)
        assert len(held_out) == eval_size and questions(train) == rl_train
        assert not questions(held_out) & (sft | rl_train)
    assert not evaluated & (sft | rl_train)


def test_synthetic_sets_keep_the_rows_the_lessons_used():
    """Held-out: the generator's first 500 rows of seed 10,000, as before. Training: the first 256
    rows of seed 1 as before (the first held-out question among seed 1's rows is row 495)."""
    assert data.load_qa("synthetic") == [{"question": p["question"], "answer": p["answer"]}
                                         for p in data.synthetic_problems(500, seed=10_000)]
    before = data.synthetic_problems(494, seed=1)
    assert data.synthetic_train(494) == before
    assert [m for _, m in data.load_conversations("synthetic")[:256]] == [
        data.row_to_messages({"problem": p["question"], "solution": p["solution"]}, "")
        for p in before[:256]]
    assert data.load_qa("synthetic-train", limit=256) == [
        {"question": p["question"], "answer": p["answer"]} for p in before[:256]]
    held_out = {p["question"] for p in data.synthetic_held_out()}
    assert data.synthetic_problems(495, seed=1)[-1]["question"] in held_out   # now left out
    assert data.synthetic_train(495)[-1] == data.synthetic_problems(496, seed=1)[-1]


def test_step_batches_cover_each_example_once_and_group_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(256)]
    steps = data.step_batches(lengths, 16, seed=0)
    assert steps == data.step_batches(lengths, 16, seed=0)
    assert sorted(i for s in steps for i in s) == list(range(256))
    padded = sum(len(s) * max(lengths[i] for i in s) for s in steps)
    import random
    order = list(range(256))
    random.Random(0).shuffle(order)
    padded_random = sum(16 * max(lengths[i] for i in order[s:s + 16]) for s in range(0, 256, 16))
    assert padded < 0.8 * padded_random  # grouping by length cuts padding


def test_padding():
    ids, mask = data.pad_left([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    batch = data.collate([{"input_ids": [5, 6], "labels": [-100, 6]},
                          {"input_ids": [7], "labels": [7]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6], [7, 0]]
    assert batch["labels"].tolist() == [[-100, 6], [7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_gsm8k_solution_format():
    assert data.gsm8k_solution("He has 2+3=<<2+3=5>>5 apples.\n#### 5") == \
        "He has 2+3=5 apples.\nThe answer is \\boxed{5}."


def test_doctests_run():
    import eksft
    for module in (data, eksft):
        assert doctest.testmod(module).failed == 0


def fake_hub(tables):
    """Stand-in for data.load_hub_rows: the Hub is unreachable here, the row handling is not."""
    def load(name, config=None, split="train"):
        return tables[(name, config, split)]
    return load


def test_openr1_takes_the_first_verified_complete_generation(monkeypatch):
    rows = [
        {"problem": "p1", "generations": ["wrong", "right1"],
         "correctness_math_verify": [False, True], "is_reasoning_complete": [True, True]},
        {"problem": "p2", "generations": ["cut off", "x"], "correctness_math_verify": [True, False],
         "is_reasoning_complete": [False, True]},  # no generation is both verified and complete
        {"problem": "p3", "generations": ["right3" + "y" * 400], "correctness_math_verify": [True],
         "is_reasoning_complete": [True]},
        {"problem": "p4", "generations": ["right4"], "correctness_math_verify": [True],
         "is_reasoning_complete": [True]},
    ]
    monkeypatch.setattr(data, "load_hub_rows",
                        fake_hub({("open-r1/OpenR1-Math-220k", "default", "train"): rows}))
    convs = list(data.load_conversations("openr1-3k", seed=0))
    assert sorted(m[-1]["content"][:6] for _, m in convs) == ["right1", "right3", "right4"]
    assert all(m[0] == SYS and m[1]["role"] == "user" for _, m in convs)
    # the seeded order is a permutation, the same for the same seed
    assert [w for w, _ in convs] == [w for w, _ in data.load_conversations("openr1-3k", seed=0)]
    # too long for --max-len: p3 is skipped, and num_samples counts only examples that fit
    examples = data.build_sft_examples(TOKENIZER, data.load_conversations("openr1-3k", seed=0),
                                       max_len=200, num_samples=2, log=lambda *_: None)
    assert len(examples) == 2


def test_gsm8k_answers_come_from_after_the_hashes(monkeypatch):
    rows = [{"question": "q", "answer": "2*3=<<2*3=6>>6\n#### 1,200"}]
    monkeypatch.setattr(data, "load_hub_rows", fake_hub({("openai/gsm8k", "main", "test"): rows,
                                                        ("openai/gsm8k", "main", "train"): rows}))
    assert data.load_qa("gsm8k") == [{"question": "q", "answer": "1200"}]
    [(where, messages)] = list(data.load_conversations("gsm8k"))
    assert where == "gsm8k, row 1"
    assert messages[-1]["content"] == "2*3=6\nThe answer is \\boxed{1200}."


def test_hub_failure_is_one_clear_line():
    with pytest.raises(DataError, match="could not load dataset 'no-such/dataset'.*Offline, use "
                                        "synthetic or a local .jsonl file"):
        list(data.load_conversations("no-such/dataset"))


# -----------------------------------------------------------------------------
# Exported data sets: files in each real schema (tests/fixtures, invented text, real columns)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def fixture(name):
    return os.path.join(FIXTURES, name)


def fixture_rows(name):
    return [json.loads(line) for line in open(fixture(name))]


QA_FILES = [  # (file, expected (question start, gold) per row, the columns line)
    ("gsm8k.jsonl", [("A baker", "1250"), ("Tom reads", "72"), ("The temperature", "-3")],
     "question from 'question', answer from the text after the last '####' in 'answer'"),
    ("math500.jsonl", [("Convert the point", "\\left( 3, \\frac{\\pi}{2} \\right)"),
                       ("What is", "1,\\!250")],
     "question from 'problem', answer from 'answer'"),
    ("openr1_math.jsonl", [("Find $x$", "4"), ("How many primes", "4"), ("Solve", "3")],
     "question from 'problem', answer from 'answer'"),
    ("gsm8k_to_json.json", [("A baker", "1250"), ("Tom reads", "72"), ("The temperature", "-3")],
     "question from 'question', answer from the text after the last '####' in 'answer'"),
]


@pytest.mark.parametrize("name,expected,columns", QA_FILES)
def test_qa_files_in_each_real_schema(name, expected, columns):
    lines = []
    rows = data.load_qa(fixture(name), log=lines.append)
    assert [(r["question"][:len(q)], r["answer"]) for r, (q, _) in zip(rows, expected)] == expected
    assert len(rows) == len(expected)
    assert lines == [f"{fixture(name)}: {columns}"]


def test_qa_parquet_export_with_null_list_columns(tmp_path):
    import pyarrow
    import pyarrow.parquet
    rows = fixture_rows("openr1_math.jsonl")
    assert rows[0]["correctness_llama"] is None and rows[0]["finish_reasons"] is None
    path = str(tmp_path / "openr1.parquet")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    assert data.load_qa(path, log=lambda *_: None) == \
        [{"question": r["problem"], "answer": r["answer"]} for r in rows]


GSM8K_GOLD = [  # (GSM8K answer column, gold): the text after the LAST ####, separators dropped
    ("5*250=<<5*250=1250>>1250\n#### 1,250", "1250"),
    ("#### 1,234,567", "1234567"),
    ("#### -1,250", "-1250"),
    ("#### 2,500.50", "2500.50"),
    ("#### 72", "72"),
    ("#### 1,25", "1,25"),              # not thousands separators: kept as written
    ("a #### b\n#### 9 ", "9"),          # the last #### counts
    ("#### 0.5", "0.5"),
]


@pytest.mark.parametrize("answer,gold", GSM8K_GOLD)
def test_gsm8k_gold_is_the_text_after_the_last_hashes(answer, gold):
    assert data.gsm8k_gold(answer) == gold


@pytest.mark.parametrize("checker", ["builtin", "math-verify", "auto"])
def test_the_checker_scores_gsm8k_golds_right(checker):
    import rl
    if checker != "builtin":
        pytest.importorskip("math_verify")
    gold = data.gsm8k_gold("#### 1,250")
    assert rl.is_equiv("1,250", gold, checker) and rl.is_equiv("1250", gold, checker)
    assert not rl.is_equiv("125", gold, checker) and not rl.is_equiv("1,251", gold, checker)


def test_sft_files_in_each_real_schema():
    log = []
    gsm8k = data.load_conversations(fixture("gsm8k.jsonl"), log=log.append)
    assert gsm8k[0][1][-1]["content"] == \
        "Each box holds 250 rolls, so 5 boxes hold 5*250=1250 rolls.\nThe answer is \\boxed{1250}."
    math500 = data.load_conversations(fixture("math500.jsonl"), log=log.append)
    assert [m[1:] for _, m in math500] == [[{"role": "user", "content": r["problem"]},
                                            {"role": "assistant", "content": r["solution"]}]
                                           for r in fixture_rows("math500.jsonl")]
    assert log == []   # only an OpenR1 export has something to say


def test_an_openr1_export_reads_as_the_openr1_alias_reads_the_hub(monkeypatch):
    rows = fixture_rows("openr1_math.jsonl")
    log = []
    from_file = data.load_conversations(fixture("openr1_math.jsonl"), log=log.append)
    # row 1: the second generation (the first is wrong); row 2: its only one; row 3: none is
    # both math-verified and complete (the Llama judge's verdict is not used), so it is skipped
    assert [(w.rpartition(" ")[2], m[-1]["content"]) for w, m in from_file] == \
        [("1", rows[0]["generations"][1]), ("2", rows[1]["generations"][0])]
    assert all(m[0] == SYS and m[1] == {"role": "user", "content": r["problem"]}
               for (_, m), r in zip(from_file, rows))
    assert log == [f"{fixture('openr1_math.jsonl')}: OpenR1-Math rows as problem + the first "
                   "generation math-verify marked correct and complete; 1 of 3 rows have none "
                   "and are skipped"]
    monkeypatch.setattr(data, "load_hub_rows",
                        fake_hub({("open-r1/OpenR1-Math-220k", "default", "train"): rows}))
    from_hub = list(data.load_conversations("openr1-3k"))
    # the alias reads the same conversations, in its seeded order, with the hub's row numbers
    assert sorted((w, json.dumps(m)) for w, m in from_hub) == \
        sorted((w.replace(fixture('openr1_math.jsonl'), 'openr1-3k'), json.dumps(m))
               for w, m in from_file)


def test_an_openr1_export_with_no_usable_row_is_refused(tmp_path):
    row = fixture_rows("openr1_math.jsonl")[2]
    path = tmp_path / "openr1.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="openr1.jsonl: no row has a generation that is both "
                                        r"correct \(correctness_math_verify\) and complete"):
        data.load_conversations(str(path), log=lambda *_: None)


def test_json_lines_array_and_broken_json_files(tmp_path):
    rows = fixture_rows("gsm8k.jsonl")
    as_lines = data.read_local_rows(fixture("gsm8k_to_json.json"))
    assert as_lines == data.read_local_rows(fixture("gsm8k.jsonl")) == list(enumerate(rows, 1))
    array = tmp_path / "array.json"
    array.write_text(json.dumps(rows, indent=1))          # a real JSON array, over many lines
    assert data.read_local_rows(str(array)) == as_lines
    assert len(data.load_conversations(str(array))) == 3
    broken_lines = tmp_path / "lines.json"
    broken_lines.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:-1] + "\n")
    broken_array = tmp_path / "array_broken.json"
    broken_array.write_text(json.dumps(rows, indent=1)[:-2])
    for path, load, message in [
            (broken_lines, data.load_qa, "lines.json, row 2: not valid JSON (Expecting ',' "
                                         "delimiter; a .json file holds a JSON array or one JSON "
                                         "object a line)"),
            (broken_lines, data.load_conversations, "lines.json, row 2: not valid JSON"),
            (broken_array, data.load_qa, "array_broken.json: not valid JSON (line 13: ")]:
        with pytest.raises(DataError, match=re.escape(message)):
            load(str(path))


QA_BAD_ROWS = [  # (second row, the error after "qa.jsonl, row 2: ")
    ({"text": "x", "gold": "1"}, "missing fields 'question' (or 'problem') and 'answer'; it has "
                                 "['gold', 'text']"),
    ({"problem": "p", "solution": "s"}, "missing field 'answer'"),
    ({"answer": "3"}, "missing field 'question' (or 'problem')"),
    ({"problem": " ", "answer": "3"}, "'problem' must be a non-empty string"),
    ({"question": "q", "answer": None}, "'answer' must be a string or a number"),
    ({"question": "q", "answer": [1, 2]}, "'answer' must be a string or a number"),
]


@pytest.mark.parametrize("row,message", QA_BAD_ROWS)
def test_qa_bad_rows_name_the_file_the_row_and_what_is_missing(tmp_path, row, message):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        data.load_qa(str(path))
    assert str(e.value) == f"{path}, row 2: {message}"


# -----------------------------------------------------------------------------
# Too long for --max-len: drop (default) or truncate (the released recipe)

def test_too_long_drop_and_truncate_against_hand_counted_tokens():
    # char tokenizer, no system prompt: "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    # is 1+4+1+1+1+1+1+9+1 = 20 tokens, then "abcdef<|im_end|>\n" 8 more: 28 tokens, and the
    # trained ones are positions 20..26 ("abcdef<|im_end|>")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "abcdef"}]
    ids, labels = data.encode_conversation(TOKENIZER, messages)
    assert len(ids) == 28 and [i for i, l in enumerate(labels) if l != IGNORE_INDEX] == \
        list(range(20, 27))

    def build(max_len, too_long, n=1):
        lines = []
        convs = [(f"f, row {i}", messages) for i in range(1, n + 1)]
        try:
            examples = data.build_sft_examples(TOKENIZER, convs, max_len, log=lines.append,
                                               too_long=too_long)
        except DataError as e:
            return str(e), lines
        return [trained_text(e["input_ids"], e["labels"]) for e in examples], lines

    assert build(28, "drop") == ([["abcdef<|im_end|>"]],
                                 ["data: 1 examples, 0 dropped as longer than --max-len 28"])
    assert build(27, "drop", n=2) == ("f: none of its 2 examples fits --max-len 27 (the shortest "
                                      "has 28 tokens)",
                                      ["data: 0 examples, 2 dropped as longer than --max-len 27"])
    # truncate at 24: ids 0..23 kept, of the response "abcd" (positions 20..23) stays trained
    examples = data.build_sft_examples(TOKENIZER, [("f, row 1", messages)], 24,
                                       log=lambda *_: None, too_long="truncate")
    assert examples[0]["input_ids"] == ids[:24] and examples[0]["labels"] == labels[:24]
    assert build(24, "truncate") == (
        [["abcd"]], ["data: 1 examples, 1 truncated to --max-len 24, 0 dropped (no response "
                     "token within the first 24)"])
    assert build(21, "truncate")[0] == [["a"]]
    # at 20 the whole response is cut off: dropped, not trained on a prompt alone
    assert build(20, "truncate") == (
        "f: none of its 1 examples fits --max-len 20 (the shortest has 28 tokens)",
        ["data: 0 examples, 0 truncated to --max-len 20, 1 dropped (no response token within "
         "the first 20)"])
    with pytest.raises(ValueError, match="too_long must be 'drop' or 'truncate'"):
        build(20, "cut")


# ----------------------------------------------------------------------------
# defaults that depend on the model's kind (data.ModelDefaults, used by eksft.py and rl.py)


def test_model_defaults_states_every_kind_in_help_and_fills_what_is_left_out():
    p = data.ArgumentParser(formatter_class=data.HelpFormatter)
    defaults = data.ModelDefaults(p, {"tiny": dict(lr=3e-3), "smol": dict(lr=1e-5),
                                      "hub": dict(lr=2e-5)})
    defaults.add("--lr", type=float, help="peak learning rate")
    defaults.add("--seed", type=int, default=0, help="a seed")
    help_text = " ".join(p.format_help().split())
    assert "peak learning rate (hub: 2e-05; smol: 1e-05; tiny: 0.003)" in help_text
    assert "a seed (default: 0)" in help_text
    for kind, lr in (("tiny", 3e-3), ("smol", 1e-5), ("hub", 2e-5)):
        args = p.parse_args([])
        defaults.fill(args, kind)
        assert (args.lr, args.seed) == (lr, 0)
    args = p.parse_args(["--lr", "0.5"])   # a flag given keeps its value
    defaults.fill(args, "smol")
    assert args.lr == 0.5


SMOL = {  # issue #25's defaults for SmolLM2 (135M) on a CPU, written out here, not read from code
    "eksft": dict(data="synthetic", lr=1e-5, batch_size=8, micro_batch_size=4, max_len=1024,
                  num_samples=256, epochs=1, warmup=0.05),
    "rl": dict(data="synthetic", reward="math", lr=1e-6, prompts_per_step=4, max_new_tokens=256,
               micro_batch_size=8, max_steps=20, eval_size=32, print_every=5),
}


@pytest.mark.parametrize("script", ["eksft", "rl"])
def test_both_scripts_fill_the_smol_kind_and_state_three_kinds(script, monkeypatch, capsys):
    import eksft
    import rl
    module = {"eksft": eksft, "rl": rl}[script]
    assert set(module.MODEL_DEFAULTS) == {"tiny", "smol", "hub"}
    assert all(d.keys() == module.MODEL_DEFAULTS["hub"].keys()
               for d in module.MODEL_DEFAULTS.values())
    monkeypatch.setattr(eksft, "model_kind", lambda name: "smol")   # as appendix A will say
    args = module.parse_args(["--model", "HuggingFaceTB/SmolLM2-135M"])
    assert args.model_kind == "smol"
    assert {key: getattr(args, key) for key in SMOL[script]} == SMOL[script]
    assert module.parse_args(["--model", "HuggingFaceTB/SmolLM2-135M", "--lr", "0.1"]).lr == 0.1
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    lr = {"eksft": "(hub: 1e-05; smol: 1e-05; tiny: 0.003)",
          "rl": "(hub: 1e-06; smol: 1e-06; tiny: 0.001)"}[script]
    assert lr in help_text
