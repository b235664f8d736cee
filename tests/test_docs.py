"""The docs say what the code does: stated defaults, commands that parse, links that resolve."""
import glob
import importlib.util
import os
import re
import shlex
import subprocess

import pytest
import torch

import eksft
import evaluate
import rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/tutorial/*.md"))]
PARSERS = {"eksft.py": eksft.parse_args, "rl.py": rl.parse_args, "evaluate.py": evaluate.parse_args}


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def section(text, title):
    """The lines of a '## title' section, up to the next '## ' heading."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def stated_defaults():
    """(flag, script, stated default) for each row of the README's table of defaults."""
    rows = []
    for line in section(read("README.md"), "Defaults that matter").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`--"):
            continue
        flag, scripts, default = cells[0].strip("`"), cells[1], cells[2]
        for script in re.findall(r"\w+\.py", scripts):
            rows.append((flag, script, default))
    return rows


def as_value(stated):
    """'off' -> False, 'on' -> True, '`0.2`' -> 0.2, '`union`' -> 'union'."""
    words = {"off": False, "on": True}
    if stated in words:
        return words[stated]
    value = stated.strip("`")
    try:
        return float(value)
    except ValueError:
        return value


def test_the_defaults_table_is_there_and_covers_the_speed_switch():
    flags = {flag for flag, _, _ in stated_defaults()}
    assert {"--static-cache", "--method", "--ratio", "--checker"} <= flags


@pytest.mark.parametrize("flag,script,stated", stated_defaults())
@pytest.mark.parametrize("model", ["tiny", "HuggingFaceTB/SmolLM2-135M", "Qwen2.5-0.5B"])
def test_stated_default_is_the_parsers(flag, script, stated, model, monkeypatch):
    """Every model kind (tiny, smol, hub): a default the table states must not depend on it."""
    if "SmolLM2" in model:
        monkeypatch.setattr(eksft, "model_kind", lambda name: "smol")
    args = PARSERS[script](["--model", model])
    got = getattr(args, flag[2:].replace("-", "_"))
    if flag == "--checker":   # stated as "`auto` with math-verify installed, else `builtin`"
        assert stated.startswith("`auto` with math-verify installed, else `builtin`")
        assert got == ("auto" if importlib.util.find_spec("math_verify") else "builtin")
        return
    expected = as_value(stated)
    assert got == expected, f"README says {flag} of {script} defaults to {stated}; it is {got!r}"


def code(text):
    """The code of a Markdown page: fenced blocks, indented lines and inline `spans`."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    indented = [line for line in prose.splitlines() if line.startswith("    ")]
    return "\n".join(blocks + indented + re.findall(r"`([^`\n]+)`", prose))


def commands(text):
    """Each 'python eksft.py|rl.py|evaluate.py ...' command of the docs' code, continuations joined
    (a shell variable gets a plausible value; an elided command, '...', is skipped)."""
    text = re.sub(r"\\\n\s*", " ", code(text)).replace("$(basename $m)", "sft")
    for m in re.finditer(r"python (eksft|rl|evaluate)\.py ([^\n#;|&)]*)", text):
        argv = shlex.split(m.group(2).replace("$m", "sft"))
        if not {"--help", "--compare"} & set(argv) and not any("..." in a for a in argv):
            yield f"{m.group(1)}.py", argv


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_parses(doc):
    found = list(commands(read(doc)))
    for script, argv in found:
        PARSERS[script](argv)   # exits (SystemExit) on a flag or value the script does not take
    if doc == "README.md":
        assert len(found) >= 6


@pytest.mark.parametrize("doc", DOCS)
def test_links_stay_in_the_repository_and_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", read(doc)):
        assert "://" not in target, f"{doc} links outside the repository: {target}"
        path = os.path.join(ROOT, os.path.dirname(doc), target.split("#")[0])
        assert os.path.exists(path), f"{doc} links to a missing file: {target}"


@pytest.mark.parametrize("doc", DOCS)
def test_no_placeholder(doc):
    pattern = re.compile(r"\b[A-Z][A-Z0-9]*_(?:BLOCK|HERE|TODO)\b|\bTODO\b|\bTBD\b|\bXXX\b|\bFIXME\b|<fill[^>]*>")
    assert pattern.search("see FINAL2_BLOCK") and pattern.search("TODO: x")   # the pattern works
    assert not pattern.findall(read(doc)), f"{doc} has an unfilled placeholder"


def test_readme_is_a_front_door():
    assert len(read("README.md").splitlines()) < 350


def test_the_readmes_copy_command_cuts_out_a_working_loss(tmp_path):
    """The awk line the README gives for copying the loss block, run as written, yields a file
    that imports alone and computes the module's loss."""
    line = next(l for l in read("README.md").splitlines() if l.startswith("awk '/^# The loss: /"))
    subprocess.run(["bash", "-c", line.replace("> eksft_loss.py", f"> {tmp_path}/eksft_loss.py")],
                   cwd=ROOT, check=True)
    namespace = {}
    exec(compile((tmp_path / "eksft_loss.py").read_text(), "eksft_loss.py", "exec"), namespace)
    torch.manual_seed(0)
    logits, ref = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5, 6], [-100, 1, 2, 3, 4, -100]])
    assert torch.equal(namespace["eksft_loss"](logits, labels, ref)[0],
                       eksft.eksft_loss(logits, labels, ref)[0])
