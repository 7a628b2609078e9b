"""The OLMo-core integration: router patch, trainer callback, run configs, training, conversion.

Modules import OLMo-core lazily or on their own import, never from this ``__init__``: the CPU
path (``cpu.enable_cpu_moe``) must run before OLMo-core's MoE kernels are first imported.
"""
