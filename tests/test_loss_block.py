"""The loss section of eksft.py pastes alone: its source text, from its banner to the next, runs in
a fresh namespace with torch and math only, and gives the module's eksft_loss (plain) and
eksft_loss_lean to the last bit."""
import ast
import builtins
import dis
import os

import pytest
import torch
import torch.nn.functional as F

import eksft

BANNER = "# " + "-" * 77
TITLE = "# The loss: "


def loss_block_source():
    """The lines from the loss section's banner up to (not including) the next banner."""
    lines = open(os.path.join(os.path.dirname(eksft.__file__), "eksft.py")).read().splitlines()
    start = next(i for i in range(len(lines) - 1)
                 if lines[i] == BANNER and lines[i + 1].startswith(TITLE))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] == BANNER)
    return "\n".join(lines[start:end]) + "\n"


def pasted():
    """The block executed as if pasted into an empty module."""
    namespace = {"__name__": "pasted_loss"}
    exec(compile(loss_block_source(), "pasted_loss.py", "exec"), namespace)
    return namespace


def global_names(code):
    """Every global name the code (and the functions and classes nested in it) reads."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= global_names(const)
    return names


def test_block_imports_only_torch_and_math():
    imported = set()
    for node in ast.walk(ast.parse(loss_block_source())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported, "the block should carry its own imports"
    assert all(name == "math" or name == "torch" or name.startswith("torch.") for name in imported), imported


def test_block_reads_no_name_it_does_not_define():
    """Caught even on code paths the inputs below do not take."""
    namespace = pasted()
    code = compile(loss_block_source(), "pasted_loss.py", "exec")
    undefined = {n for n in global_names(code) if n not in namespace and not hasattr(builtins, n)}
    assert not undefined, f"the loss block uses names defined outside it: {sorted(undefined)}"
    for name in ("eksft_loss", "eksft_loss_lean", "token_statistics", "selection_slots",
                 "IGNORE_INDEX"):
        assert name in namespace
    assert namespace["IGNORE_INDEX"] == eksft.IGNORE_INDEX == -100


def random_case(seed, B=3, T=12, V=40):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    ref_logits = logits + torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100               # prompt
    labels[0, -4:] = -100              # padding
    labels[1, 6:8] = -100              # a user turn between two assistant turns
    return logits, ref_logits, labels


OPTIONS = [
    dict(),
    dict(combine="intersection", ratio=0.5),
    dict(scope="batch", ratio=0.3, lambda_entropy=0.1, lambda_kl=0.2),
    dict(select_largest_entropy=False, select_largest_kl=False, kl_threshold=0.0),
    dict(ce_normalizer=50, reg_normalizer=7, chunk_size=5),
    dict(ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("name", ["eksft_loss", "eksft_loss_lean"])
def test_pasted_loss_equals_the_module_loss(name, options):
    if name == "eksft_loss":   # the plain loss has no chunks
        options = {k: v for k, v in options.items() if k != "chunk_size"}
    results = []
    for loss_fn in (getattr(eksft, name), pasted()[name]):
        logits, ref_logits, labels = random_case(seed=0)
        logits.requires_grad_(True)
        loss, stats = loss_fn(logits, labels, ref_logits, return_masks=True, **options)
        loss.backward()
        results.append((loss.detach(), stats, logits.grad))
    (loss_a, stats_a, grad_a), (loss_b, stats_b, grad_b) = results
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(grad_a, grad_b)
    assert stats_a.keys() == stats_b.keys()
    for key in stats_a:
        assert torch.equal(stats_a[key], stats_b[key]), key
    assert grad_a.abs().sum() > 0


@pytest.mark.parametrize("name", ["eksft_loss", "eksft_loss_lean"])
def test_pasted_loss_without_selection_is_cross_entropy(name):
    """An independent check of the pasted copy: ratio 0 and no regularisers is F.cross_entropy on
    the shifted labels, without a reference model."""
    pasted_loss = pasted()[name]
    logits, _, labels = random_case(seed=1)
    logits.requires_grad_(True)
    loss, _ = pasted_loss(logits, labels, None, ratio=0.0, lambda_entropy=0.0, lambda_kl=0.0)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
