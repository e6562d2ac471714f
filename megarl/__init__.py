"""megarl: Megatron-style reinforcement learning for LLM math reasoning.

The core (ops, algorithms, configs) imports with torch alone; megatron-core, vLLM, transformers
and nemo-run are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"
