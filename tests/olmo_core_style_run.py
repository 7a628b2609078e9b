"""A tiny training script written the way OLMo-core's own scripts are, for the tests.

    python tests/olmo_core_style_run.py SAVE_FOLDER TOKEN_FILE TOKENIZER_JSON STEPS

Config builders make OLMo-core config objects (``TransformerConfig.olmoe_1B_7B`` shrunk, with its
default ``moe_reordered_norm`` block; ``TransformerTrainModuleConfig``; ``NumpyFSLDatasetConfig``;
``TrainerConfig`` with a checkpointer and OLMo-core's ``ConfigSaverCallback``), and the main
block builds and trains them as ``olmo_core.script_utils.train`` does, on one CPU process. GatePro
can only come in through the environment (``OLMOE_GATEPRO``, ``OLMOE_GATEPRO_METRICS``): the one
olmoe_gatepro line is ``enable_cpu_moe()``, which OLMo-core's MoE needs on a CPU (its token
copies are CUDA kernels).
"""

import sys

import torch

if not torch.cuda.is_available():
    from olmoe_gatepro.olmo_core.cpu import enable_cpu_moe

    enable_cpu_moe()

from olmo_core.config import Config
from olmo_core.data import NumpyDataLoaderConfig, NumpyDatasetDType, NumpyFSLDatasetConfig, TokenizerConfig
from olmo_core.nn.transformer import TransformerConfig
from olmo_core.optim import AdamWConfig
from olmo_core.train import Duration, TrainerConfig, prepare_training_environment, teardown_training_environment
from olmo_core.train.callbacks import Callback, CheckpointerCallback, ConfigSaverCallback
from olmo_core.train.train_module import TransformerTrainModuleConfig
from olmo_core.utils import seed_all

SEQUENCE_LENGTH, SEQUENCES_PER_STEP = 16, 2


class MetricNamesFile(Callback):
    """A stand-in for W&B: the names of the metrics the trainer hands its loggers, one line per step."""

    def log_metrics(self, step, metrics):
        with open(f"{self.trainer.save_folder}/logged_metric_names.txt", "a") as file:
            file.write(" | ".join([str(step), *sorted(metrics)]) + "\n")


def build_model_config(tokenizer: TokenizerConfig) -> TransformerConfig:
    config = TransformerConfig.olmoe_1B_7B(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4)
    moe = config.block.feed_forward_moe
    moe.num_experts, moe.hidden_size, moe.router.top_k = 8, 32, 2
    return config


def build_config(save_folder: str, token_file: str, tokenizer_file: str, steps: int) -> dict:
    tokenizer = TokenizerConfig(vocab_size=256, eos_token_id=0, pad_token_id=1, identifier=tokenizer_file)
    work_dir = f"{save_folder}/work"
    return {
        "model": build_model_config(tokenizer),
        "train_module": TransformerTrainModuleConfig(
            rank_microbatch_size=SEQUENCES_PER_STEP * SEQUENCE_LENGTH, max_sequence_length=SEQUENCE_LENGTH,
            optim=AdamWConfig(lr=1e-3), compile_model=False),
        "dataset": NumpyFSLDatasetConfig(paths=[token_file], tokenizer=tokenizer, sequence_length=SEQUENCE_LENGTH,
                                         dtype=NumpyDatasetDType.uint16, work_dir=work_dir),
        "data_loader": NumpyDataLoaderConfig(global_batch_size=SEQUENCES_PER_STEP * SEQUENCE_LENGTH, seed=0,
                                             num_workers=0, work_dir=work_dir),
        "trainer": TrainerConfig(save_folder=save_folder, work_dir=work_dir, max_duration=Duration.steps(steps),
                                 metrics_collect_interval=1, save_overwrite=True)
        .with_callback("checkpointer", CheckpointerCallback(save_interval=steps, ephemeral_save_interval=None))
        .with_callback("config_saver", ConfigSaverCallback())
        .with_callback("metric_names", MetricNamesFile()),
    }


if __name__ == "__main__":
    save_folder, token_file, tokenizer_file, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    prepare_training_environment(backend=None)  # as script_utils.train does without CUDA
    config = build_config(save_folder, token_file, tokenizer_file, steps)
    seed_all(0)
    model = config["model"].build(init_device="meta")
    train_module = config["train_module"].build(model)
    data_loader = config["data_loader"].build(config["dataset"].build(), dp_process_group=train_module.dp_process_group)
    trainer = config["trainer"].build(train_module, data_loader)
    trainer.callbacks["config_saver"].config = {
        name: value.as_config_dict() if isinstance(value, Config) else value for name, value in config.items()}
    trainer.fit()
    teardown_training_environment()
