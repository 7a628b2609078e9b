"""GatePro's math checked against the plain-loop reference: shared by ``selftest`` and the tests."""

import torch

from olmoe_gatepro.core.gatepro import gatepro_logits
from olmoe_gatepro.core.reference import BF16_NEAR_TIE_CASES, BF16_NEAR_TIE_LOGITS, reference_gatepro

__all__ = ["random_case", "math_mismatches", "compile_failure"]


def random_case(seed: int, num_experts: int = 8, dim: int = 16, tokens: int = 32,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (tokens, N), router weight (N, dim)) in ``dtype``, standard normal from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_experts, dim, generator=generator)
    logits = torch.randn(tokens, num_experts, generator=generator)
    return logits.to(dtype), weight.to(dtype)


def math_mismatches(device: torch.device | str = "cpu", reference=reference_gatepro) -> list[str]:
    """Where ``gatepro_logits`` on ``device`` departs from ``reference``; empty when it conforms.

    In float32, bfloat16 and float16 (128 tokens, 16 experts, lambda 0.05) it must return float32
    equal to the reference bit for bit, with some logit penalised; on the bfloat16 near-tie at
    lambda 1e-4 it must choose the reference's top-2, and change at least one stock choice.
    """
    mismatches = []
    for seed, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16)):
        logits, weight = random_case(seed, num_experts=16, dim=32, tokens=128, dtype=dtype)
        expected = reference(logits, weight, 0.05)
        actual = gatepro_logits(logits.to(device), weight.to(device), 0.05).cpu()
        name = str(dtype).removeprefix("torch.")
        if actual.dtype != torch.float32 or not torch.equal(actual, expected):
            mismatches.append(name)
        elif torch.equal(actual, logits.float()):
            mismatches.append(f"{name}: lambda = 0.05 penalised no logit")
    tie = torch.tensor(BF16_NEAR_TIE_LOGITS, dtype=torch.bfloat16)
    changed = 0
    for weight, _ in BF16_NEAR_TIE_CASES:
        weight = torch.tensor(weight, dtype=torch.bfloat16)
        chosen = set(gatepro_logits(tie.to(device), weight.to(device), 1e-4).topk(2).indices[0].tolist())
        if chosen != set(reference(tie, weight, 1e-4).topk(2).indices[0].tolist()):
            mismatches.append("bf16 near-tie")
        changed += chosen != set(tie.float().topk(2).indices[0].tolist())
    if not changed:
        mismatches.append("bf16 near-tie: lambda = 1e-4 changed no choice")
    return mismatches


def compile_failure(device: torch.device | str = "cpu", backend: str = "inductor") -> str | None:
    """None when ``gatepro_logits`` compiles with ``fullgraph=True`` (no graph break) and equals eager on
    ``device``; else what went wrong, in one line."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda logits, weight: gatepro_logits(logits, weight, 0.05), fullgraph=True, backend=backend)
    logits, weight = (tensor.to(device) for tensor in random_case(4, num_experts=16, dim=32, tokens=64))
    try:
        result = compiled(logits, weight)
    except Exception as error:  # a graph break or a compiler failure: both mean no fullgraph compile here
        return f"torch.compile(fullgraph=True) failed: {type(error).__name__}: {str(error).splitlines()[0]}"
    if not torch.equal(result, gatepro_logits(logits, weight, 0.05)):
        return "compiled result differs from eager"
    return None
