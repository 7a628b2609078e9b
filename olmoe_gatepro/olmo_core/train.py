"""OLMo-core objects from a ``RunConfig``: model, data, train module, trainer, and training.

The model is ``TransformerConfig.olmoe_1B_7B`` with the sizes and block type of
``RunConfig.model``, so everything the config does not name (SwiGLU experts, dropless MoE,
RMSNorm eps 1e-6, no router bias) stays OLMo-core's OLMoE recipe. Note that olmo-core's own
default block is ``moe_reordered_norm`` (norm after attention and MoE, an OLMoE ablation),
while released OLMoE-1B-7B and transformers' ``OlmoeForCausalLM`` are pre-norm (``moe``); our
configs use ``moe`` so that a checkpoint has OLMoE's architecture.

Reruns and interrupts: ``train`` into a save folder that holds a run resumes it from its latest
checkpoint, and refuses (``ConfigError`` naming the keys) a config that differs from the one
recorded there in anything but ``RESUME_MAY_CHANGE``; a finished run is reported finished and
not touched. Ctrl-C (SIGINT) or SIGTERM cancels through OLMo-core's graceful path: the trainer
checks for cancellation every step (``cancel_check_interval=1``; its checks run on the CPU
bookkeeping group), saves a checkpoint of the step reached and ``train`` raises
``InterruptedRun``; a rerun continues from that checkpoint.
"""

import contextlib
import dataclasses
import glob
import json
import os
import signal
from typing import Any, NamedTuple

from olmoe_gatepro.checkpoints import complete_steps
from olmoe_gatepro.jsonl import differing_settings, read_settings
from olmoe_gatepro.olmo_core.run_config import OLMO_CORE_CONFIG_FILE, RUN_CONFIG_FILE, ConfigError, ModelConfig, RunConfig

__all__ = ["TRAINED_FILE", "build_transformer_config", "build_train_components", "monitoring_callbacks", "evaluation_callbacks",
           "resolved_config", "train", "TrainComponents", "check_data_paths", "check_rerun", "InterruptedRun",
           "RESUME_MAY_CHANGE"]

# Run-config keys (dotted prefixes) a rerun may change: what is logged, evaluated and saved when, and
# train.max_tokens (to extend or shorten a run; the schedule of the steps still to come follows the new length).
RESUME_MAY_CHANGE = ("name", "train.save_folder", "train.max_tokens", "train.checkpoint_interval_steps",
                     "train.metrics_interval_steps", "data.num_workers", "callbacks", "evaluation")
TRAINED_FILE = "train.done"  # in the save folder: the last training there reached train.max_tokens
OLMO_CORE_CANCEL_CHECK_INTERVAL = 25  # OLMo-core's default; the trackers keep polling their services this often


class InterruptedRun(Exception):
    """Training stopped before the end, with a checkpoint of the step reached; rerun to continue."""

    def __init__(self, save_folder: str, step: int, signal_number: int | None):
        self.signal_number = signal_number
        cause = signal.Signals(signal_number).name if signal_number else "the run was cancelled"
        super().__init__(f"{cause}: stopped at step {step} with a checkpoint in {save_folder}; "
                         "rerun the same command to continue")

    @property
    def exit_code(self) -> int:
        """128 + the signal number (130 for Ctrl-C), or 1 for a cancel without a signal."""
        return 128 + self.signal_number if self.signal_number else 1


def check_data_paths(run: RunConfig) -> None:
    """Refuse a local ``data.paths`` entry that names no file (a glob: that matches none); URLs are not checked."""
    if not run.data.paths:
        raise ConfigError("data.paths: no token files given")
    for pattern in run.data.paths:
        if "://" in pattern:
            continue
        found = glob.glob(pattern) if any(ch in pattern for ch in "*?[") else [pattern] * os.path.isfile(pattern)
        if not found:
            raise ConfigError(f"data.paths: {pattern!r} matches no file")


def _may_change(key: str) -> bool:
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in RESUME_MAY_CHANGE)


def check_rerun(run: RunConfig) -> int | None:
    """The latest complete checkpoint step in ``run``'s local save folder (None: nothing to resume).

    Raises ``ConfigError`` naming every differing key when the folder's recorded run config
    differs from ``run`` in a key outside ``RESUME_MAY_CHANGE``.
    """
    folder = run.train.save_folder
    if "://" in folder or not os.path.isdir(folder):
        return None
    try:
        recorded = read_settings(os.path.join(folder, RUN_CONFIG_FILE), folder_flag="train.save_folder")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if recorded is not None:
        differing = [line for line in differing_settings(recorded, json.loads(json.dumps(dataclasses.asdict(run))))
                     if not _may_change(line.split(":")[0])]
        if differing:
            raise ConfigError(f"train.save_folder {folder} holds a run with other settings: {'; '.join(differing)}; "
                              f"rerun with the recorded ones ({RUN_CONFIG_FILE}; only {', '.join(RESUME_MAY_CHANGE)} "
                              "may change), or use another train.save_folder")
    steps = complete_steps(folder)
    return steps[-1] if steps else None



class TrainComponents(NamedTuple):
    """OLMo-core config objects of one run, each with its own ``build``."""

    model: Any
    train_module: Any
    dataset: Any
    data_loader: Any
    trainer: Any


def build_transformer_config(model: ModelConfig):
    """An OLMo-core ``TransformerConfig`` for ``model``; build it with ``.build(init_device=...)``."""
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig

    config = TransformerConfig.olmoe_1B_7B(
        block_name=TransformerBlockType(model.block),
        vocab_size=model.embedding_size,
        d_model=model.d_model,
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        qk_norm=model.qk_norm,
        rope_theta=model.rope_theta,
    )
    moe = config.block.feed_forward_moe
    config.block.feed_forward_moe = dataclasses.replace(
        moe,
        num_experts=model.num_experts,
        hidden_size=model.expert_hidden_size,
        router=dataclasses.replace(moe.router, top_k=model.top_k),
        lb_loss_weight=model.lb_loss_weight,
        z_loss_weight=model.z_loss_weight,
    )
    config.init_std = model.init_std
    return config


def build_train_components(run: RunConfig, work_dir: str | None = None) -> TrainComponents:
    """The OLMo-core configs of a run; ``train`` builds and runs them."""
    from olmo_core.config import DType
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.optim import AdamWConfig, CosWithWarmup, OptimGroupOverride
    from olmo_core.train import Duration, TrainerConfig
    from olmo_core.train.callbacks import CheckpointerCallback
    from olmo_core.train.train_module import TransformerTrainModuleConfig
    from olmo_core.train.train_module.transformer.config import TransformerDataParallelConfig

    from olmoe_gatepro.olmo_core.callback import GateProCallback, InterruptCallback
    from olmoe_gatepro.olmo_core.stop import StopFileCallback

    train, optim = run.train, run.optim
    work_dir = work_dir or os.path.join(train.save_folder, "work")
    tokenizer = TokenizerConfig(
        vocab_size=run.model.vocab_size, eos_token_id=run.data.eos_token_id, pad_token_id=run.data.pad_token_id
    )
    dataset = NumpyFSLDatasetConfig(
        paths=list(run.data.paths),
        expand_glob=any(ch in path for path in run.data.paths for ch in "*?["),
        tokenizer=tokenizer,
        sequence_length=train.sequence_length,
        dtype=run.data.token_dtype,
        work_dir=work_dir,
    )
    data_loader = NumpyDataLoaderConfig(
        global_batch_size=train.tokens_per_step, seed=train.seed, num_workers=run.data.num_workers,
        work_dir=work_dir,
    )
    bf16 = train.precision == "bf16"
    data_parallel = TransformerDataParallelConfig(
        name={"fsdp": DataParallelType.fsdp, "hsdp": DataParallelType.hsdp, "ddp": DataParallelType.ddp}[train.sharding],
        param_dtype=DType.bfloat16 if bf16 and train.sharding != "ddp" else None,
        reduce_dtype=DType.float32,
        shard_degree=train.hsdp_shard_degree,
    )
    no_decay = [] if optim.decay_embeddings else [OptimGroupOverride(params=["embeddings.weight"], opts=dict(weight_decay=0.0))]
    train_module = TransformerTrainModuleConfig(
        rank_microbatch_size=train.micro_batch_sequences * train.sequence_length,
        max_sequence_length=train.sequence_length,
        optim=AdamWConfig(
            lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
            group_overrides=no_decay or None,
        ),
        scheduler=CosWithWarmup(units="tokens", warmup=optim.warmup_tokens, alpha_f=optim.final_lr_fraction),
        max_grad_norm=optim.grad_clip,
        compile_model=train.compile,
        dp_config=data_parallel,
        autocast_precision=DType.bfloat16 if bf16 and train.sharding == "ddp" else None,
    )
    trainer = (
        TrainerConfig(
            save_folder=train.save_folder,
            work_dir=work_dir,
            max_duration=Duration.tokens(train.max_tokens),
            metrics_collect_interval=min(10, train.metrics_interval_steps),
            cancel_check_interval=train.cancel_check_interval_steps,  # default 1: Ctrl-C stops at the next step
        )
        # Saved synchronously: OLMo-core 3.0 records an async save's duration from a background thread,
        # at different times on different ranks, and the final metrics reduction of a multi-rank run
        # then waits forever on one rank (seen in tests/integration/test_slurm.py; allenai/OLMo-core#831).
        .with_callback("checkpointer", CheckpointerCallback(save_interval=train.checkpoint_interval_steps,
                                                            save_async=False))
        .with_callback("interrupt", InterruptCallback())
        .with_callback("gatepro", GateProCallback(gatepro=run.gatepro, metrics_interval_steps=train.metrics_interval_steps))
        .with_callback("stop_file", StopFileCallback())
    )
    for name, callback in {**monitoring_callbacks(run), **evaluation_callbacks(run, tokenizer, work_dir)}.items():
        trainer = trainer.with_callback(name, callback)
    return TrainComponents(build_transformer_config(run.model), train_module, dataset, data_loader, trainer)


def monitoring_callbacks(run: RunConfig) -> dict:
    """OLMo-core callbacks of the run config's ``callbacks:`` section, by name."""
    import torch
    from olmo_core.train.callbacks import (
        CometCallback,
        ConfigSaverCallback,
        GarbageCollectorCallback,
        GPUMemoryMonitorCallback,
        ProfilerCallback,
        WandBCallback,
    )

    from olmoe_gatepro.olmo_core.callback import MetricsFileCallback

    settings, callbacks = run.callbacks, {}
    if settings.wandb.enabled:
        wandb = settings.wandb
        callbacks["wandb"] = WandBCallback(name=wandb.name or run.name, project=wandb.project, entity=wandb.entity,
                                           group=wandb.group, cancel_check_interval=OLMO_CORE_CANCEL_CHECK_INTERVAL)
    if settings.comet.enabled:
        comet = settings.comet
        callbacks["comet"] = CometCallback(name=comet.name or run.name, project=comet.project, workspace=comet.entity,
                                           cancel_check_interval=OLMO_CORE_CANCEL_CHECK_INTERVAL)
    if settings.gpu_memory and torch.cuda.is_available():
        callbacks["gpu_memory"] = GPUMemoryMonitorCallback()
    if settings.gc_interval is not None:
        callbacks["garbage_collector"] = GarbageCollectorCallback(gc_interval=settings.gc_interval)
    if settings.profiler.enabled:
        profiler = settings.profiler
        callbacks["profiler"] = ProfilerCallback(skip_first=profiler.skip_first, wait=profiler.wait,
                                                 warmup=profiler.warmup, active=profiler.active)
    if settings.save_config:
        callbacks["config_saver"] = ConfigSaverCallback()
    if settings.metrics_file is not None:
        callbacks["metrics_file"] = MetricsFileCallback(file_name=settings.metrics_file)
    return callbacks


def evaluation_callbacks(run: RunConfig, tokenizer, work_dir: str) -> dict:
    """OLMo-core's in-loop evaluator callbacks of the run config's ``evaluation:`` section, by name.

    ``tokenizer``: the run's OLMo-core ``TokenizerConfig``. The downstream tasks tokenise with
    ``data.tokenizer`` (``bytes`` is written as a ``tokenizer.json`` into ``work_dir``).
    """
    from olmo_core.data import NumpyPaddedFSLDatasetConfig
    from olmo_core.io import deterministic_glob_directory
    from olmo_core.train import Duration
    from olmo_core.train.callbacks import DownstreamEvaluatorCallbackConfig, LMEvaluatorCallbackConfig

    from olmoe_gatepro.data import byte_tokenizer, tokenizer_file

    settings, callbacks = run.evaluation, {}
    finish = settings.on_finish and run.train.max_steps % settings.interval_steps != 0  # else the interval has it
    when = dict(eval_interval=settings.interval_steps, eval_on_finish=finish,
                eval_duration=Duration.epochs(1) if settings.max_batches is None else Duration.steps(settings.max_batches))
    if settings.downstream_tasks:
        identifier = tokenizer_file(run.data.tokenizer) or run.data.tokenizer
        if run.data.tokenizer == "bytes":
            identifier = os.path.join(work_dir, "byte_tokenizer.json")
            os.makedirs(work_dir, exist_ok=True)
            byte_tokenizer().backend_tokenizer.save(f"{identifier}.{os.getpid()}")  # every rank, then one rename each
            os.replace(f"{identifier}.{os.getpid()}", identifier)
        callbacks["downstream_evaluator"] = DownstreamEvaluatorCallbackConfig(
            tasks=list(settings.downstream_tasks), tokenizer=dataclasses.replace(tokenizer, identifier=identifier), **when)
    if settings.held_out:
        paths, metadata = [], []
        for held_out in settings.held_out:
            for pattern in held_out.paths:
                try:
                    files = deterministic_glob_directory(pattern) if any(ch in pattern for ch in "*?[") else [pattern]
                except FileNotFoundError:  # the folder of a local pattern
                    files = []
                if not files:
                    raise ConfigError(f"evaluation.held_out {held_out.label!r}: {pattern!r} matches no file")
                paths += files
                metadata += [{"label": held_out.label}] * len(files)
        dataset = NumpyPaddedFSLDatasetConfig(paths=paths, metadata=metadata, tokenizer=tokenizer,
                                              sequence_length=run.train.sequence_length, dtype=run.data.token_dtype,
                                              work_dir=work_dir)
        callbacks["lm_evaluator"] = LMEvaluatorCallbackConfig(eval_dataset=dataset, **when)
    return callbacks


def resolved_config(run: RunConfig, parts: TrainComponents) -> dict:
    """The run config and the OLMo-core configs built from it, as one JSON-ready dict."""
    return {"run": dataclasses.asdict(run),
            **{name: getattr(parts, name).as_config_dict() for name in parts._fields}}


def train(run: RunConfig) -> str:
    """Train ``run`` in this process (one rank of ``torchrun``); resumes from ``save_folder``; a line saying what was done.

    Before anything is built: the data paths are checked, a rerun's config against the recorded
    one (``check_rerun``), and a finished run returns at once. Rank 0 writes the resolved config
    to ``save_folder/run_config.json`` (what ``convert`` reads). Without CUDA it trains on the CPU
    with gloo, OLMo-core's MoE token copies done by torch (``olmo_core.cpu``): meant for tiny
    configs and tests. Raises ``InterruptedRun`` when the run stopped before its end, after saving a checkpoint
    (a signal, a ``STOP`` file in the save folder, a tracker's cancel). Rank 0 removes
    ``save_folder/train.done`` when it starts and writes it when the run reaches its end.
    """
    check_data_paths(run)
    latest = check_rerun(run)
    if latest is not None and latest >= run.train.max_steps:
        return f"{run.train.save_folder}: finished, step {latest} of {run.train.max_steps}; nothing to train"
    import torch

    if not torch.cuda.is_available():
        from olmoe_gatepro.olmo_core.cpu import enable_cpu_moe

        enable_cpu_moe()
    from olmo_core.distributed.utils import get_rank
    from olmo_core.exceptions import OLMoConfigurationError
    from olmo_core.train import prepare_training_environment, teardown_training_environment
    from olmo_core.utils import seed_all

    from olmoe_gatepro.jsonl import write_text_atomically

    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    prepare_training_environment(seed=run.train.seed, backend=backend)
    try:
        parts = build_train_components(run)  # refuses held-out patterns that match nothing, before any write
        if get_rank() == 0:
            os.makedirs(run.train.save_folder, exist_ok=True)
            config_path = os.path.join(run.train.save_folder, RUN_CONFIG_FILE)
            write_text_atomically(config_path, json.dumps(dataclasses.asdict(run), indent=2))
            with contextlib.suppress(FileNotFoundError):  # from an earlier, shorter run
                os.remove(os.path.join(run.train.save_folder, TRAINED_FILE))
        seed_all(run.train.seed)
        model = parts.model.build(init_device="meta")
        train_module = parts.train_module.build(model)
        data_loader = parts.data_loader.build(parts.dataset.build(), dp_process_group=train_module.dp_process_group)
        try:
            trainer = parts.trainer.build(train_module, data_loader)  # builds the evaluators' data too
        except (OLMoConfigurationError, FileNotFoundError) as error:
            raise ConfigError(f"{run.name}: OLMo-core cannot set up the run as configured: {error}") from None
        if run.callbacks.save_config:
            resolved = resolved_config(run, parts)
            trainer.callbacks["config_saver"].config = resolved  # also hands it to the trackers
            if get_rank() == 0:
                write_text_atomically(os.path.join(run.train.save_folder, OLMO_CORE_CONFIG_FILE),
                                      json.dumps(resolved, indent=2, default=str))
        trainer.fit()  # loads the latest checkpoint in save_folder first, if there is one
        if trainer.is_canceled:
            raise InterruptedRun(run.train.save_folder, trainer.global_step, trainer.callbacks["interrupt"].signal_number)
        if get_rank() == 0:
            record = {"step": trainer.global_step, "tokens": trainer.global_train_tokens_seen}
            write_text_atomically(os.path.join(run.train.save_folder, TRAINED_FILE), json.dumps(record) + "\n")
    finally:
        teardown_training_environment()
    return f"{run.train.save_folder}: trained to step {run.train.max_steps}"
