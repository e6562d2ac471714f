"""RL checkpoints: run_dir/checkpoints/step_NNNNNN/ holding each model-parallel rank's model and
optimizer state (and the PPO critic's, files prefixed "critic_"), every rank's RNG states, and
trainer_state.json (step, data position, reward state such as the HAPO history).

Writes go to step_NNNNNN.tmp and are renamed by rank 0 after every rank finished, so a crash
mid-save never leaves a checkpoint that looks complete; only the newest `keep_last` are kept.
Resuming needs the same tp/pp layout (the files are per model-parallel rank).
"""

from __future__ import annotations

import json
import os
import random
import shutil

import torch
import torch.distributed as dist

from megarl.trainers.megatron_train import load_rank_state, save_rank_state


def _ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save(run_dir: str, step: int, model, groups, trainer_state: dict, *, keep_last: int, critic=None) -> str:
    """Saves the actor `model` (and the PPO `critic`, files prefixed "critic_") with the RNG and
    trainer state; returns the checkpoint directory."""
    root = _ckpt_root(run_dir)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier()
    save_rank_state(tmp, model, groups)
    if critic is not None:
        save_rank_state(tmp, critic, groups, prefix="critic_")
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{dist.get_rank()}.pt"))
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "world_size": dist.get_world_size(),
                       "layout": {"tp": groups.layout.tp, "pp": groups.layout.pp, "vpp": groups.layout.vpp},
                       "critic": critic is not None, **trainer_state}, f)
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def latest(run_dir: str) -> str | None:
    root = _ckpt_root(run_dir)
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    return os.path.join(root, done[-1]) if done else None


def load(path: str, model, groups, critic=None) -> dict:
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if state["world_size"] != dist.get_world_size():
        raise ValueError(f"checkpoint {path} was saved with world size {state['world_size']}, this run has {dist.get_world_size()}")
    lay = state["layout"]
    if (lay["tp"], lay["pp"], lay["vpp"]) != (groups.layout.tp, groups.layout.pp, groups.layout.vpp):
        raise ValueError(f"checkpoint {path} was saved with layout {lay}, this run uses {groups.layout}")
    has_critic = bool(state.get("critic", False))
    if has_critic != (critic is not None):
        raise ValueError(f"checkpoint {path} was saved {'with' if has_critic else 'without'} a critic, this run "
                         f"{'has' if critic is not None else 'has none'} (advantage.estimator 'gae' builds one)")
    load_rank_state(path, model, groups)
    if critic is not None:
        load_rank_state(path, critic, groups, prefix="critic_")
    _set_rng_state(torch.load(os.path.join(path, f"rng_rank{dist.get_rank()}.pt"), weights_only=False))
    return state
