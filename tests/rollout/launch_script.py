"""The ONE 4-rank launch behind every megatron-core check of tests/rollout:

    torchrun --standalone --nproc_per_node=4 tests/rollout/launch_script.py OUT_DIR

runs megatron_engine_script.run (-> OUT_DIR/megatron_engine.json) and then bridge_script.run
(-> OUT_DIR/bridge/results.json) in the same processes: each process pays megatron-core's
start-up (~8 s) once. Started by the session fixture `rollout_launch` (tests/rollout/conftest.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# Before anything imports megatron: `import megarl.rollout` (and its lazy engine exports) must
# import neither megatron, transformers nor vLLM (checked here because this process starts clean;
# test_megatron_engine.py asserts on OUT_DIR/lazy_import.json).
import megarl.rollout  # noqa: E402

LAZY_IMPORT = {"megatron_after_import": "megatron" in sys.modules}
from megarl.rollout import HFEngine, MegatronEngine, MegatronEngineConfig, VLLMEngine  # noqa: E402,F401
from megarl.rollout.megatron_engine import MegatronEngine as _direct  # noqa: E402

LAZY_IMPORT.update(
    same_object=MegatronEngine is _direct,
    config_default_max_batch=megarl.rollout.MegatronEngineConfig().max_batch,
    heavy_after_engines=sorted(m for m in ("megatron", "transformers", "vllm") if m in sys.modules),
)
try:
    megarl.rollout.NoSuchEngine  # noqa: B018
    LAZY_IMPORT["unknown_name_error"] = None
except AttributeError as e:
    LAZY_IMPORT["unknown_name_error"] = str(e)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bridge_script  # noqa: E402
import megatron_engine_script  # noqa: E402

from megarl.parallel.groups import init_distributed  # noqa: E402


def main() -> int:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    rank, world = init_distributed()
    if rank == 0:
        (out_dir / "lazy_import.json").write_text(json.dumps(LAZY_IMPORT))
    t0 = time.time()
    megatron_engine_script.run(out_dir / "megatron_engine.json", rank, world)
    t1 = time.time()
    bridge_dir = out_dir / "bridge"
    if rank == 0:
        bridge_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    bridge_script.run(bridge_dir, rank, world)
    if rank == 0:
        print(f"launch_script: megatron_engine {t1 - t0:.1f} s, bridge {time.time() - t1:.1f} s", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
