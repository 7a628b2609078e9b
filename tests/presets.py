"""This project's test presets: small runs of ``reproduce`` and ``study``, added to the package's presets.

``conftest.py`` registers them for every test; the package itself offers only the real presets.
"""

from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.pipelines.presets import (
    PAPER_GRID,
    REPRODUCE_PRESETS,
    STUDY_PRESETS,
    ReproducePreset,
    StudyPreset,
    StudySetting,
    TinyRunConfig,
)

TEST_REPRODUCE_PRESETS = {
    "tiny": ReproducePreset(
        run=TinyRunConfig(steps=4, global_batch_sequences=4, sequence_length=32, n_layers=1, num_experts=4, top_k=2,
                          d_model=32, n_heads=2, expert_hidden_size=16, metrics_interval_steps=2),
        arms=(("baseline", GateProConfig(enabled=False)), ("gatepro", GateProConfig(penalty=0.05))),
        seeds=(0, 1),
        eval_limit=2,
        eval_tasks=("arc_challenge", "copa"),  # two tasks keep the tests short; test_eval covers all five
        inspect_tokens=256,
    ),
}
TEST_STUDY_PRESETS = {
    # Two settings, a few steps.
    "minimal": StudyPreset(
        run=TinyRunConfig(steps=4, global_batch_sequences=2, sequence_length=32, n_layers=2, num_experts=8, top_k=2, metrics_interval_steps=2),
        settings=(PAPER_GRID[0], StudySetting("lambda=0.1", GateProConfig(penalty=0.1))),
        seeds=(0,),
        lb_loss_weights=(0.01,),
    ),
}


def register() -> None:
    """Add the test presets to the package's preset tables (idempotent)."""
    REPRODUCE_PRESETS.update(TEST_REPRODUCE_PRESETS)
    STUDY_PRESETS.update(TEST_STUDY_PRESETS)
