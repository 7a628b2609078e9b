"""The Hugging Face transformers integration: GatePro in transformers' MoE routers."""
