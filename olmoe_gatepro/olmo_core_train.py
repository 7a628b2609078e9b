"""OLMo-core objects from a ``RunConfig``: the model config (and, later, the trainer).

The model is ``TransformerConfig.olmoe_1B_7B`` with the sizes of ``RunConfig.model``, so
everything the config does not name (reordered norm, SwiGLU experts, dropless MoE, qk-norm
placement, RMSNorm eps) stays OLMo-core's OLMoE recipe.
"""

import dataclasses

from olmoe_gatepro.config import ModelConfig

__all__ = ["build_transformer_config"]


def build_transformer_config(model: ModelConfig):
    """An OLMo-core ``TransformerConfig`` for ``model``; build it with ``.build(init_device=...)``."""
    from olmo_core.nn.transformer import TransformerConfig

    config = TransformerConfig.olmoe_1B_7B(
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
