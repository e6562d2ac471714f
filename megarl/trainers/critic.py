"""The PPO critic: a megatron-core GPT with a value head, trained next to the actor.

    values   <- forward-only over the rollouts (last pipeline stage; None elsewhere), V(s_t) at the
                position whose logits predict response token t, i.e. aligned with the response mask
    adv, ret <- ADVANTAGE_ESTIMATORS["gae"](rewards, values)      (in rl.py)
    update   <- for each of the actor's mini-batches: clipped value loss over micro-batches,
                its own optimizer step and grad-norm clip

Values exist on the last pipeline stage only, like the log-probs: GAE, the actor loss and the
value loss all run there, so nothing has to travel to the other stages.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megarl.trainers.config import CriticConfig

# Summed over micro-batches and DP ranks (each is normalised by global counts).
CRITIC_LOSS_KEYS = ("vf_loss", "vf_clip_frac")


class Critic:
    """Builds, loads and trains the critic at the actor's layout.

    cfg.hf_dir (or, when null, the actor's `actor_hf_dir`) gives the weights: an HF
    {Qwen2,Llama}ForTokenClassification with one label loads its value head too; any other HF
    model (a causal LM) gives the body and the value head starts fresh.
    """

    def __init__(self, cfg: CriticConfig, actor_hf_dir: str, layout, groups, *, dtype: torch.dtype,
                 use_distributed_optimizer: bool, vocab_size: int) -> None:
        from megarl.models.builder import build_model
        from megarl.models.hf_config import arch_spec
        from megarl.models.mappings import iter_safetensors, load_hf_state_into
        from megarl.trainers.data import resolve_model_dir
        from megarl.trainers.megatron_train import wrap_for_training

        self.cfg = cfg
        self.groups = groups
        hf_dir = resolve_model_dir(cfg.hf_dir) if cfg.hf_dir else actor_hf_dir
        self.spec = arch_spec(os.path.join(hf_dir, "config.json"))
        if self.spec.vocab_size != vocab_size:
            raise ValueError(f"critic.hf_dir {hf_dir!r}: vocab_size {self.spec.vocab_size} differs from the actor's "
                             f"{vocab_size}; the critic reads the actor's token ids")
        chunks = build_model(self.spec, layout, head="value", dtype=dtype, groups=groups)
        load_hf_state_into(chunks, self.spec, layout, iter_safetensors(hf_dir),
                           head_from_checkpoint=self.spec.hf_head == "value")
        o = cfg.optim
        self.model = wrap_for_training(chunks, groups, lr=o.lr, weight_decay=o.weight_decay, beta1=o.beta1,
                                       beta2=o.beta2, eps=o.eps, clip_grad=o.clip_grad,
                                       use_distributed_optimizer=use_distributed_optimizer,
                                       bf16=dtype == torch.bfloat16)

    def values(self, mbs: list[dict], shape: tuple[int, int]) -> torch.Tensor | None:
        """[B, S] float32 values V at every position (last pipeline stage; None elsewhere)."""
        from megarl.models.heads import values_from_output
        from megarl.trainers.megatron_train import run_microbatches
        from megarl.trainers.rl import scatter_rows

        def loss_fn(mb, out):
            return out.new_zeros(()), {"values": values_from_output(out.float()).detach()}

        for c in self.model.chunks:
            c.eval()
        out = run_microbatches(self.model.chunks, mbs, loss_fn, dp=self.groups.dp, forward_only=True)
        return scatter_rows([o["values"] for o in out], mbs, *shape) if out else None

    def update(self, mbs: list[dict], num_tokens: int, num_seqs: int) -> tuple[torch.Tensor, float]:
        """One optimizer step of the clipped value loss over `mbs` (dicts with "mask",
        "old_values", "returns" on the last stage). Returns (this rank's sums of
        CRITIC_LOSS_KEYS over its micro-batches, float64; zeros off the last stage) and the
        global grad norm before clipping."""
        from megarl.algorithms.losses import compute_critic_loss
        from megarl.models.heads import values_from_output
        from megarl.trainers.megatron_train import optimizer_step, run_microbatches

        def loss_fn(mb, out):
            out_ = compute_critic_loss(values_from_output(out.float()), mb["old_values"], mb["returns"], mb["mask"],
                                       self.cfg.loss, global_num_tokens=max(num_tokens, 1),
                                       global_num_seqs=max(num_seqs, 1))
            return out_.loss, {k: v.detach() for k, v in out_.metrics.items()}

        for c in self.model.chunks:
            c.train()
        outs = run_microbatches(self.model.chunks, mbs, loss_fn, dp=self.groups.dp, forward_only=False)
        _, grad_norm = optimizer_step(self.model)
        sums = torch.zeros(len(CRITIC_LOSS_KEYS), dtype=torch.float64)
        for o in outs:
            for j, k in enumerate(CRITIC_LOSS_KEYS):
                sums[j] += float(o[k])
        return sums, grad_norm


def value_stats(values_BS: torch.Tensor, returns_BS: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """Additive float64 sums over response tokens: [n, sum R, sum R^2, sum V, sum (R-V), sum (R-V)^2].

    Summing them over ranks and passing the total to `explained_variance_metrics` gives the
    global-batch values."""
    m = mask_BS.to(torch.float64)
    r = returns_BS.to(torch.float64)
    v = values_BS.to(torch.float64)
    d = r - v
    return torch.stack([m.sum(), (r * m).sum(), (r * r * m).sum(), (v * m).sum(), (d * m).sum(), (d * d * m).sum()])


def explained_variance_metrics(stats: torch.Tensor) -> dict[str, float]:
    """explained_variance = 1 - Var(R - V) / Var(R) (nan when Var(R) = 0), values/returns means."""
    n, sr, srr, sv, sd, sdd = stats.tolist()
    if n < 1:
        return {"explained_variance": float("nan"), "values_mean": float("nan"), "returns_mean": float("nan")}
    var_r = srr / n - (sr / n) ** 2
    var_d = sdd / n - (sd / n) ** 2
    ev = 1.0 - var_d / var_r if var_r > 1e-12 else float("nan")
    return {"explained_variance": ev, "values_mean": sv / n, "returns_mean": sr / n}


def global_sum(t: torch.Tensor, contributes: bool) -> torch.Tensor:
    """SUM over the world of `t` from the ranks that contribute (zeros from the others)."""
    t = t.clone() if contributes else torch.zeros_like(t)
    dist.all_reduce(t)
    return t
