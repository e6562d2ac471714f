"""Process groups as explicit objects, launch helpers, and the CPU compatibility layer that lets
megatron-core run without CUDA.

Nothing here imports megatron-core at module import time: `groups` and `cpu_compat` import it
inside the functions that need it.
"""
