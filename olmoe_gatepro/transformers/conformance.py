"""Does a patched transformers OLMoE route as the plain-loop reference? Shared by ``selftest`` and the tests."""

import torch
import torch.nn.functional as F

from olmoe_gatepro.core.reference import reference_gatepro
from olmoe_gatepro.transformers.patch import olmoe_routers

__all__ = ["record_routing", "choice_mismatches", "loss_and_grads", "step_differences"]


def record_routing(model, input_ids: torch.Tensor, **kwargs) -> tuple[list[tuple], object]:
    """One no-grad forward: per router, in call order, (router, its input (T, d), its outputs
    (logits (T, N), weights (T, k), chosen (T, k))); and the model's output."""
    seen = []
    hooks = [router.register_forward_hook(
        lambda module, args, out: seen.append((module, args[0].reshape(-1, module.hidden_dim), out)))
        for router in olmoe_routers(model)]
    try:
        with torch.no_grad():
            output = model(input_ids=input_ids, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen, output


def choice_mismatches(seen: list[tuple], penalty: float, reference=reference_gatepro) -> tuple[int, int]:
    """(routers whose chosen expert sets differ from ``reference``'s at ``penalty``, routers where the
    reference's sets differ from stock's); compared on the CPU, ``seen`` from ``record_routing``."""
    wrong = moved = 0
    for router, hidden, (_, _, chosen) in seen:
        raw = F.linear(hidden, router.weight).cpu()
        expected = reference(raw, router.weight.detach().cpu(), penalty).softmax(-1).topk(router.top_k).indices
        expected = expected.sort(-1).values
        wrong += not torch.equal(chosen.cpu().sort(-1).values, expected)
        moved += not torch.equal(raw.topk(router.top_k).indices.sort(-1).values, expected)
    return wrong, moved


def loss_and_grads(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's language-model loss, auxiliary loss and every parameter's gradient, by name."""
    model.zero_grad(set_to_none=True)
    output = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    output.loss.backward()
    return output.loss.detach(), output.aux_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def step_differences(stock: tuple, other: tuple) -> list[str]:
    """What differs, bit for bit or in dtype, between two ``loss_and_grads`` results: "loss", "aux loss", parameter names."""
    def differ(a, b):
        return a.dtype != b.dtype or not torch.equal(a, b)

    names = [name for name, a, b in (("loss", stock[0], other[0]), ("aux loss", stock[1], other[1])) if differ(a, b)]
    return names + [name for name, grad in stock[2].items() if name not in other[2] or differ(grad, other[2][name])]
