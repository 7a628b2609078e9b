"""``olmo_core.cpu``'s token copies compute what OLMo-core's Triton kernels compute.

The kernels themselves run in a child process under Triton's interpreter (``TRITON_INTERPRET=1``,
read when Triton is imported), on inputs built as OLMo-core's MoE builds them: slots sorted by
expert, running counts per expert, a width that is no multiple of the kernels' block, bfloat16 and
float32, and a capacity that drops tokens for the binned copies.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from olmoe_gatepro.olmo_core import cpu

TOKENS, TOP_K, EXPERTS, WIDTH, CAPACITY = 7, 2, 4, 72, 3

CHILD = textwrap.dedent("""
    import sys
    import torch
    import olmo_core.kernels.moe as kernels
    from triton.runtime.autotuner import Autotuner

    for kernel in vars(kernels).values():
        if isinstance(kernel, Autotuner):
            kernel.configs = kernel.configs[:1]  # the interpreter cannot benchmark
    case = torch.load(sys.argv[1])
    outputs = {}
    for name, arguments in case.items():
        outputs[name] = getattr(kernels, name.split(":")[0])(*arguments)
    torch.save(outputs, sys.argv[2])
""")


def _cases() -> dict[str, tuple]:
    """{function:dtype:weights: arguments}, for every copy OLMo-core's MoE calls."""
    generator = torch.Generator().manual_seed(0)
    experts = torch.randint(0, EXPERTS, (TOKENS * TOP_K,), generator=generator)
    experts[:CAPACITY + 1] = 0  # expert 0 gets more slots than the capacity
    bin_ids, indices = torch.sort(experts, stable=True)
    bin_ids, indices = bin_ids.int(), indices.int()
    bins = torch.cumsum(torch.bincount(experts, minlength=EXPERTS), 0).int()
    cases = {}
    for dtype in (torch.float32, torch.bfloat16):
        tokens = torch.randn(TOKENS, WIDTH, generator=generator).to(dtype)
        slots = torch.randn(TOKENS * TOP_K, WIDTH, generator=generator).to(dtype)
        binned = torch.randn(EXPERTS, CAPACITY, WIDTH, generator=generator).to(dtype)
        for weights in (None, torch.rand(TOKENS * TOP_K, generator=generator).to(dtype)):
            key = f"{dtype}:{'weighted' if weights is not None else 'unweighted'}"
            cases[f"gather:{key}"] = (tokens, indices, bin_ids, weights, bins, TOP_K)
            cases[f"scatter:{key}"] = (slots, indices, bin_ids, weights, bins, TOP_K)
            cases[f"binned_gather:{key}"] = (tokens, indices, weights, bins, CAPACITY, TOP_K)
            cases[f"binned_scatter:{key}"] = (binned, indices, weights, bins, TOP_K)
        cases[f"scatter_wgrad:{dtype}"] = (slots, tokens, indices, bin_ids, bins, TOP_K)
        cases[f"binned_scatter_wgrad:{dtype}"] = (binned, tokens, indices, bins, TOP_K)
    return cases


@pytest.fixture(scope="module")
def kernel_outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpu-moe")
    cases = _cases()
    torch.save(cases, folder / "cases.pt")
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder / "cases.pt"), str(folder / "outputs.pt")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return cases, torch.load(folder / "outputs.pt")


def _compare(cases, expected, name, **tolerance):
    ours = getattr(cpu, name.split(":")[0])(*cases[name])
    assert ours.dtype == expected[name].dtype and ours.shape == expected[name].shape, name
    if tolerance:
        torch.testing.assert_close(ours, expected[name], **tolerance, msg=name)
    else:
        assert torch.equal(ours, expected[name]), name
    return ours


def test_copies_equal_the_kernels_bit_for_bit(kernel_outputs):
    cases, expected = kernel_outputs
    exact = [name for name in cases if "wgrad" not in name and ("float32" in name or "unweighted" in name)]
    assert len(exact) == 12
    for name in exact:
        _compare(cases, expected, name)


def test_scaled_bfloat16_copies_round_to_nearest_where_the_interpreter_truncates(kernel_outputs):
    """Compiled Triton and torch round a float32 product to the nearest bfloat16; the interpreter cuts its low bits."""
    cases, expected = kernel_outputs
    x, indices, _, weights, _, top_k = cases["gather:torch.bfloat16:weighted"]
    products = x.float()[indices.long() // top_k] * weights.float()[indices.long()][:, None]
    assert torch.equal(expected["gather:torch.bfloat16:weighted"], (products.view(torch.int32) & -65536).view(torch.float32).bfloat16())
    assert torch.equal(cpu.gather(*cases["gather:torch.bfloat16:weighted"]), products.bfloat16())
    for name in [name for name in cases if "bfloat16:weighted" in name]:  # at most an ulp a term apart
        _compare(cases, expected, name, rtol=2 ** -6, atol=0.05)


def test_weight_gradients_equal_the_kernels_up_to_the_order_of_a_float32_sum(kernel_outputs):
    """A dot product over the width: the kernel and torch add its 72 float32 terms in different orders."""
    cases, expected = kernel_outputs
    for name in [name for name in cases if "wgrad" in name]:
        bfloat16 = "bfloat16" in name  # and the interpreter truncates the sum to bfloat16
        ours = _compare(cases, expected, name, rtol=2 ** -7 if bfloat16 else 1e-5, atol=1e-5)
        assert torch.equal(ours == 0, expected[name] == 0) and (ours != 0).any(), name  # the same dropped slots


def test_enabling_twice_leaves_one_stand_in_that_copies_with_these_functions():
    import olmo_core.ops.moe as ops

    cpu.enable_cpu_moe()
    stand_in = ops.kernels
    cpu.enable_cpu_moe()
    assert ops.kernels is stand_in and stand_in.cpu_moe
    x, *rest = _cases()["gather:torch.float32:weighted"]
    assert torch.equal(stand_in.gather(x, *rest), cpu.gather(x, *rest))
