"""``olmoe-gatepro selftest``: does GatePro work on this machine's hardware and software, and what does it cost?

Runs on CUDA when there is a GPU, else on the CPU, and reports one line per check: PASS, FAIL,
or SKIP (a check that cannot run here, never counted as passed), with the measured figure.
The verdict is PASS only when no check failed.

Checks: installed versions inside the supported ranges (read from this package's own
requirements) and the environment hook; the GatePro math against the plain-loop reference in
fp32, bf16 and fp16 (the bf16 near-tie case included); the patched transformers and OLMo-core
routers on the device (routing equal to the reference, and at lambda = 0 gradients equal to
stock's bit for bit); ``torch.compile(fullgraph=True)`` without graph breaks; on CUDA, no
device-to-host synchronisation in the patched routers; a tiny OLMo-core OLMoE (its real MoE
kernels on CUDA, torch's token copies on a CPU) trained with GatePro, stopped half way and
resumed to end bit for bit where an uninterrupted run ends, converted to a Hugging Face folder
that stock transformers loads with OLMo-core's logits (and, without ``--quick``, a baseline
run); and the cost, GatePro / stock,
interleaved in one run, at OLMoE-1B-7B's router shape (d 2048, 64 experts, top-8) and for a
small training step. Cost targets (router forward + backward at most 5% more, training
throughput ratio at least 0.99) are for a GPU with ``torch.compile``; a ratio fails only when
far off (``FAR_OFF``).
"""

import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CHECKS", "CheckResult", "FAR_OFF", "TIMED", "run_selftest", "interleaved_seconds", "format_report", "results_json"]

FAR_OFF = {"router_overhead": 2.0, "train_throughput": 0.5}  # fail beyond these; targets are 1.05 and 0.99
TIMED = ("router overhead", "training throughput")
OLMOE_ROUTER = (2048, 64, 8)  # d_model, experts, top-k of OLMoE-1B-7B


@dataclass(frozen=True)
class CheckResult:
    """One line of the report: ``status`` is PASS, FAIL or SKIP."""

    name: str
    status: str
    figure: str


class _Context:
    def __init__(self, device: torch.device, quick: bool, reference: Callable):
        self.device, self.quick, self.reference = device, quick, reference


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_seconds(steps: list[Callable[[], None]], device: torch.device, repeats: int,
                        warmup: int = 1) -> list[list[float]]:
    """Seconds per call of each step, ``repeats`` times, alternating which goes first, so noise hits all."""
    for _ in range(warmup):
        for step in steps:
            step()
    _sync(device)
    times: list[list[float]] = [[] for _ in steps]
    for repeat in range(repeats):
        order = range(len(steps)) if repeat % 2 == 0 else reversed(range(len(steps)))
        for index in order:
            _sync(device)
            started = time.perf_counter()
            steps[index]()
            _sync(device)
            times[index].append(time.perf_counter() - started)
    return times


def _check_versions(context: _Context) -> tuple[str, str]:
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    found, bad = [], []
    for text in requires("olmoe-gatepro") or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            bad.append(f"{requirement.name} missing (needs {requirement.specifier})")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            bad.append(f"{requirement.name} {installed} outside {requirement.specifier}")
        elif requirement.name in ("torch", "ai2-olmo-core", "transformers", "lm-eval", "datasets"):
            found.append(f"{requirement.name} {installed}")
    return ("FAIL", "; ".join(bad)) if bad else ("PASS", ", ".join(found))


def _check_environment(context: _Context) -> tuple[str, str]:
    from olmoe_gatepro.env_activation import SWITCH, config_from_env

    try:
        settings = config_from_env()
    except ValueError as error:
        return "FAIL", str(error)
    hook = os.path.join(sysconfig.get_paths()["purelib"], "olmoe_gatepro_env.pth")
    state = "stock routing" if settings is None else f"GatePro on (penalty {settings.penalty:g})"
    installed = "start-up hook installed" if os.path.exists(hook) else "start-up hook NOT installed"
    figure = f"{SWITCH}={os.environ.get(SWITCH, '')!r}: {state}; {installed}"
    return ("PASS" if os.path.exists(hook) else "FAIL"), figure


def _check_math(context: _Context) -> tuple[str, str]:
    from olmoe_gatepro.core.conformance import math_mismatches

    mismatches = math_mismatches(context.device, context.reference)
    if mismatches:
        return "FAIL", f"differs from the reference: {', '.join(mismatches)}"
    return "PASS", "fp32, bf16, fp16 equal to the reference bit for bit; bf16 near-tie decided by lambda = 1e-4"


def _tiny_olmoe(seed: int, experts: int = 8):
    from olmoe_gatepro.pipelines.presets import TinyRunConfig
    from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe

    config = TinyRunConfig(seed=seed, d_model=32, n_layers=2, n_heads=2, num_experts=experts, top_k=2,
                           expert_hidden_size=16)
    return build_tiny_olmoe(config)


def _check_transformers_router(context: _Context) -> tuple[str, str]:
    from olmoe_gatepro.transformers.conformance import choice_mismatches, loss_and_grads, record_routing, step_differences
    from olmoe_gatepro.transformers.patch import olmoe_routers, patch_transformers

    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1)).to(context.device)
    model = _tiny_olmoe(0).to(context.device).eval()
    with torch.no_grad():
        for router in olmoe_routers(model):
            router.weight.normal_(0, 0.5)  # wider than the init, so the penalty moves choices
    patch_transformers(model=model, penalty=0.5)  # at 0.05 no choice of these tokens moves
    seen, _ = record_routing(model, tokens)
    wrong, moved = choice_mismatches(seen, 0.5, context.reference)
    if not moved:  # else routing equal to the reference would say nothing about the patch
        return "FAIL", "the penalty moves no choice on these inputs: the check cannot tell a patched router from stock"
    stock = loss_and_grads(_tiny_olmoe(3).to(context.device).train(), tokens)
    patched_model = _tiny_olmoe(3).to(context.device).train()
    patch_transformers(model=patched_model, penalty=0.0)
    same = not step_differences(stock, loss_and_grads(patched_model, tokens))
    if wrong or not same:
        return "FAIL", f"{wrong} of {len(seen)} layers route unlike the reference; gradients at lambda 0 " \
                       f"{'equal' if same else 'differ from'} stock"
    return "PASS", f"{len(seen)} layers route as the reference; loss, aux loss and gradients at lambda 0 equal stock's"


def _check_olmo_core_router(context: _Context) -> tuple[str, str]:
    from olmoe_gatepro.olmo_core.conformance import linear_router
    from olmoe_gatepro.olmo_core.patch import patch_olmo_core, unpatch_olmo_core

    x = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(2)).to(context.device)
    stock, patched = linear_router(0).to(context.device), linear_router(0).to(context.device)
    patch_olmo_core(model=torch.nn.ModuleList([patched]), penalty=0.3)
    try:
        _, indices, _, _ = patched(x)
        raw = F.linear(x.float(), patched.weight.detach().view(8, 16)).cpu()
        expected = context.reference(raw, patched.weight.detach().view(8, 16).cpu(), 0.3).softmax(-1).topk(2).indices
        routes = torch.equal(indices.cpu().sort(-1).values, expected.sort(-1).values)
        if torch.equal(raw.topk(2).indices.sort(-1).values, expected.sort(-1).values):
            return "FAIL", "the penalty moves no choice on these inputs: the check cannot tell a patched router from stock"
        patch_olmo_core(model=torch.nn.ModuleList([patched]), penalty=0.0)
        grads = []
        for router in (stock, patched):
            inputs = x.clone().requires_grad_(True)
            weights, _, _, aux_loss = router(inputs)
            (weights.sum() + aux_loss).backward()
            grads.append((inputs.grad, router.weight.grad))
        same = all(torch.equal(a, b) for a, b in zip(*grads))
    finally:
        unpatch_olmo_core(torch.nn.ModuleList([patched]))
    if not routes or not same:
        return "FAIL", f"routing {'equals' if routes else 'differs from'} the reference; gradients at lambda 0 " \
                       f"{'equal' if same else 'differ from'} stock"
    return "PASS", "MoELinearRouter routes as the reference; gradients at lambda 0 equal stock's"


def _check_compile(context: _Context) -> tuple[str, str]:
    from olmoe_gatepro.core.conformance import compile_failure

    started = time.perf_counter()
    failure = compile_failure(context.device)
    if failure is not None:
        return "FAIL", failure
    return "PASS", f"gatepro_logits compiles with fullgraph=True, equal to eager ({time.perf_counter() - started:.1f} s)"


def _check_host_syncs(context: _Context) -> tuple[str, str]:
    if context.device.type != "cuda":
        return "SKIP", "no CUDA device: device-to-host synchronisations are a GPU matter"
    from olmoe_gatepro.olmo_core.conformance import linear_router
    from olmoe_gatepro.olmo_core.patch import patch_olmo_core, unpatch_olmo_core

    router = linear_router(0).to(context.device)
    patch_olmo_core(model=torch.nn.ModuleList([router]), penalty=1e-4)
    x = torch.randn(2, 64, 16, device=context.device, requires_grad=True)
    router(x)  # first call outside the check: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        weights, _, _, aux_loss = router(x)
        (weights.sum() + aux_loss).backward()
    except RuntimeError as error:
        return "FAIL", f"a synchronisation in the patched router: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        unpatch_olmo_core(torch.nn.ModuleList([router]))
    return "PASS", "0 device-to-host synchronisations in forward + backward (set_sync_debug_mode('error'))"


def _check_router_overhead(context: _Context) -> tuple[str, str]:
    from olmoe_gatepro.olmo_core.conformance import forward_backward, timed_router_pair
    from olmoe_gatepro.olmo_core.patch import unpatch_olmo_core

    d_model, experts, top_k = OLMOE_ROUTER
    tokens = 2048 if context.quick else 16384
    dtype = torch.bfloat16 if context.device.type == "cuda" else torch.float32
    routers = timed_router_pair(d_model, experts, top_k, context.device)
    x = torch.randn(1, tokens, d_model, device=context.device, dtype=dtype, requires_grad=True)
    try:
        stock, gatepro = interleaved_seconds([functools.partial(forward_backward, router, x) for router in routers],
                                             context.device, 5 if context.quick else 15)
    finally:
        unpatch_olmo_core(torch.nn.ModuleList([routers[1]]))
    ratio = statistics.median(gatepro) / statistics.median(stock)
    figure = (f"router forward + backward, GatePro / stock = {ratio:.3f} at d {d_model}, {experts} experts, top-{top_k}, "
              f"{tokens} tokens, eager, {context.device.type} (target <= 1.05 on a GPU with compile; fails above "
              f"{FAR_OFF['router_overhead']})")
    return ("PASS" if ratio <= FAR_OFF["router_overhead"] else "FAIL"), figure


def _check_train_throughput(context: _Context) -> tuple[str, str]:
    from olmoe_gatepro.pipelines.presets import TinyRunConfig
    from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe
    from olmoe_gatepro.transformers.patch import patch_transformers, unpatch_transformers

    config = TinyRunConfig(d_model=256, n_layers=2, n_heads=4, num_experts=16, top_k=4, expert_hidden_size=256,
                           sequence_length=256, lb_loss_weight=0.01)
    models = [build_tiny_olmoe(config).to(context.device).train() for _ in range(2)]
    patch_transformers(model=models[1], penalty=1e-4)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-4) for model in models]
    tokens = torch.randint(0, 256, (4, config.sequence_length), generator=torch.Generator().manual_seed(5)).to(context.device)

    def step(model, optimizer):
        def run():
            loss = model(input_ids=tokens, labels=tokens).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    try:
        stock, gatepro = interleaved_seconds([step(m, o) for m, o in zip(models, optimizers)], context.device,
                                             4 if context.quick else 12)
    finally:
        unpatch_transformers(models[1])
    ratio = statistics.median(stock) / statistics.median(gatepro)
    figure = (f"training throughput GatePro / stock = {ratio:.3f} (tiny OLMoE, 16 experts, {tokens.numel()} tokens a "
              f"step, {context.device.type}; target >= 0.99; fails below {FAR_OFF['train_throughput']})")
    return ("PASS" if ratio >= FAR_OFF["train_throughput"] else "FAIL"), figure


def _tiny_olmo_core_run(folder: str, tokens: str, steps: int, gatepro: bool) -> dict:
    """The shipped tiny OLMoE (``configs/tiny.yaml``) at 2 x 16 tokens a step, a checkpoint every step."""
    from olmoe_gatepro.olmo_core.run_config import load_run_config

    run = load_run_config("tiny", [
        "--name=selftest", f"--train.max_tokens={steps * 32}", "--train.sequence_length=16",
        "--train.global_batch_sequences=2", "--train.micro_batch_sequences=2", "--train.sharding=ddp",
        f"--train.precision={'bf16' if torch.cuda.is_available() else 'fp32'}", f"--train.save_folder={folder}",
        "--train.checkpoint_interval_steps=1", "--train.metrics_interval_steps=1", "--optim.warmup_tokens=32",
        f"--data.paths=[{tokens}/*.npy]", f"--gatepro.enabled={str(gatepro).lower()}", "--gatepro.penalty=0.05",
    ])
    return json.loads(json.dumps(dataclasses.asdict(run)))


def _olmo_core_train(work: str, name: str, tokens: str, steps: int, gatepro: bool, kill_at: int | None = None) -> str:
    """Train in a fresh process (as ``olmoe-gatepro train``); with ``kill_at``, SIGKILL it once that step's
    checkpoint is complete, as a pre-emption would."""
    from olmoe_gatepro.olmo_core.conformance import kill_after_checkpoint

    folder = os.path.join(work, name)
    config = os.path.join(work, f"{name}.json")  # JSON is YAML: the run config loader reads it
    with open(config, "w") as file:
        json.dump(_tiny_olmo_core_run(folder, tokens, steps, gatepro), file)
    command = [sys.executable, "-m", "olmoe_gatepro.cli", "train", config]
    if kill_at is not None:
        kill_after_checkpoint(command, folder, kill_at)
        return folder
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"training {name} failed: {result.stderr.strip().splitlines()[-1:]}")
    return folder


def _check_olmo_core_end_to_end(context: _Context) -> tuple[str, str]:
    from safetensors.torch import load_file

    from olmoe_gatepro.olmo_core.convert import convert_checkpoint
    from olmoe_gatepro.data import write_token_files
    from olmoe_gatepro.pipelines.presets import CORPUS_MODULES

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="olmoe-gatepro-selftest-") as work:
        sources = [inspect.getsourcefile(importlib.import_module(name)) for name in CORPUS_MODULES[:2]]
        tokens = os.path.join(work, "tokens")
        write_token_files(sources, tokens, "bytes", 0, "uint16", 10_000_000)
        steps = 2 if context.quick else 4
        whole = _olmo_core_train(work, "gatepro", tokens, steps, gatepro=True)
        _olmo_core_train(work, "resumed", tokens, steps, gatepro=True, kill_at=steps // 2)  # pre-empted ...
        resumed = _olmo_core_train(work, "resumed", tokens, steps, gatepro=True)  # ... and restarted
        if not context.quick:
            _olmo_core_train(work, "baseline", tokens, steps, gatepro=False)
        record = convert_checkpoint(whole, os.path.join(work, "hf"), validate=True)
        convert_checkpoint(resumed, os.path.join(work, "hf-resumed"), validate=False)
        first, second = (load_file(os.path.join(work, folder, "model.safetensors")) for folder in ("hf", "hf-resumed"))
        exact = first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    difference = record["validation"]["max_abs_logit_difference"]
    runs = "GatePro" + ("" if context.quick else " and baseline")
    figure = (f"{runs} trained {steps} steps; resumed run {'equal to' if exact else 'DIFFERS from'} the uninterrupted "
              f"one bit for bit; converted, loads in stock transformers, logits within {difference:.1e} of OLMo-core "
              f"({time.perf_counter() - started:.0f} s)")
    return ("PASS" if exact else "FAIL"), figure


CHECKS: tuple[tuple[str, Callable[[_Context], tuple[str, str]]], ...] = (
    ("versions", _check_versions),
    ("environment hook", _check_environment),
    ("GatePro math", _check_math),
    ("transformers router", _check_transformers_router),
    ("OLMo-core router", _check_olmo_core_router),
    ("torch.compile", _check_compile),
    ("host syncs", _check_host_syncs),
    ("OLMo-core end to end", _check_olmo_core_end_to_end),
    ("router overhead", _check_router_overhead),
    ("training throughput", _check_train_throughput),
)


@contextlib.contextmanager
def _quiet_libraries():
    """Third-party warnings and progress bars off inside a check: the report is the output."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            if bars:
                transformers_logging.enable_progress_bar()


def run_selftest(device: str | None = None, quick: bool = False, reference: Callable | None = None,
                 only: tuple[str, ...] = (), echo=print) -> list[CheckResult]:
    """Run the checks (``only`` these, when given), printing each line as it ends.

    ``reference`` replaces the plain-loop reference (a test hands in a wrong one to see FAIL).
    """
    unknown = sorted(set(only) - {name for name, _ in CHECKS})
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; known: {', '.join(name for name, _ in CHECKS)}")
    from olmoe_gatepro.core.reference import reference_gatepro

    context = _Context(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), quick,
                       reference or reference_gatepro)
    if not torch.cuda.is_available():
        from olmoe_gatepro.olmo_core.cpu import enable_cpu_moe

        enable_cpu_moe()  # OLMo-core's MoE on CPU tensors
    name = torch.cuda.get_device_name(context.device) if context.device.type == "cuda" else "CPU"
    echo(f"olmoe-gatepro selftest on {context.device} ({name}), torch {torch.__version__}"
         f"{', quick' if quick else ''}")
    results = []
    for check_name, check in CHECKS:
        if only and check_name not in only:
            continue
        try:
            with _quiet_libraries():
                status, figure = check(context)
        except Exception as error:  # a check that crashes has failed; the others still run
            status, figure = "FAIL", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        result = CheckResult(check_name, status, figure)
        echo(format_report([result], verdict=False))
        results.append(result)
    echo(format_report(results, lines=False))
    return results


def format_report(results: list[CheckResult], verdict: bool = True, lines: bool = True) -> str:
    """One line per check, then (with ``verdict``) the verdict line."""
    text = [f"{r.status:<4}  {r.name:<20} {r.figure}" for r in results] if lines else []
    if verdict:
        failed = [r.name for r in results if r.status == "FAIL"]
        skipped = sum(r.status == "SKIP" for r in results)
        text.append(f"verdict: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}: "
                    f"{sum(r.status == 'PASS' for r in results)} passed, {len(failed)} failed, {skipped} skipped")
    return "\n".join(text)


def results_json(results: list[CheckResult]) -> str:
    """The report as JSON: every check, and the verdict."""
    return json.dumps({"checks": [dataclasses.asdict(r) for r in results],
                       "passed": not any(r.status == "FAIL" for r in results)}, indent=2)
