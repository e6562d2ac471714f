"""Learned reward models in the RL loop: an ORM or a PRM, frozen, forward-only on the rollouts.

    orm  score_b = sigmoid(alpha * r_m(b)) + (r_v(b) - 1)            (Qwen2.5-Math shaping)
         r_m: the ORM's score at the response's last token; r_v: the weighted sum of reward.terms.
    prm  token_rewards[b] = r_v(b) at the last response token
                            + weight * refine(p_1..p_K)_k at the end token of step k
         p_k = P(step k correct) from the PRM at step k's end (or at the step token that
         replaces / follows it); refine = reward.model.shaping (clip / delta / clip_delta / none).

The model runs at the actor's tp/pp layout; its outputs exist on the last pipeline stage and are
broadcast over the pipeline group, so every rank computes the same rewards (the metrics are
logged from the first stage).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megarl.trainers.config import RewardModelConfig


@dataclass
class PrmInputs:
    """The PRM's view of a batch. Shapes: B rows, K = most steps in a row.

    input_ids [B, S']: what the PRM reads (the rollout, or with step tokens);
    score_pos [B, K]: where in input_ids each step's score is read;
    step_end [B, K]: the response-mask position (logits position, as in RolloutBatch) of each
    step's last token, where its reward goes; step_mask [B, K]: real steps.
    """

    input_ids: torch.Tensor
    score_pos: torch.Tensor
    step_end: torch.Tensor
    step_mask: torch.Tensor


def single_token_id(tokenizer, text: str, key: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{key} {text!r} is {len(ids)} tokens {ids} in the actor's tokenizer; it must be exactly one")
    return int(ids[0])


def prm_inputs(input_ids_BS: torch.Tensor, prompt_lengths_B: torch.Tensor, response_lengths_B: torch.Tensor,
               separator_id: int, step_token_id: int | None, eos_ids: tuple[int, ...], pad_id: int) -> PrmInputs:
    """Splits each response into steps and builds the PRM's input.

    A step ends at each separator token; the last step ends at the last response token before
    any trailing EOS (a response of EOS only has no step). With step_token_id, each separator is
    replaced by the step token and one step token follows the last step unless it ended on a
    separator (Qwen2.5-Math-PRM's "<extra_0>" format); the score is read at the step token.
    Without it, the score is read at the step's last token itself.
    """
    B = input_ids_BS.shape[0]
    rows, pos_rows, end_rows = [], [], []
    for b in range(B):
        start, length = int(prompt_lengths_B[b]), int(response_lengths_B[b])
        seq = input_ids_BS[b, : start + length].tolist()
        content = length
        while content > 0 and seq[start + content - 1] in eos_ids:
            content -= 1
        ends = [i for i in range(content) if seq[start + i] == separator_id]
        if content > 0 and (not ends or ends[-1] != content - 1):
            ends.append(content - 1)
        prm_seq = list(seq[: start + content])
        pos = [start + e for e in ends]
        if step_token_id is not None:
            prm_seq = [step_token_id if i >= start and t == separator_id else t for i, t in enumerate(prm_seq)]
            if content > 0 and seq[start + content - 1] != separator_id:
                prm_seq.append(step_token_id)
                pos[-1] = start + content
        rows.append(prm_seq)
        pos_rows.append(pos)
        end_rows.append([start - 1 + e for e in ends])
    S = max(len(r) for r in rows)
    K = max(1, max(len(p) for p in pos_rows))
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    score_pos = torch.zeros((B, K), dtype=torch.long)
    step_end = torch.zeros((B, K), dtype=torch.long)
    step_mask = torch.zeros((B, K), dtype=torch.bool)
    for b in range(B):
        ids[b, : len(rows[b])] = torch.tensor(rows[b], dtype=torch.long)
        k = len(pos_rows[b])
        score_pos[b, :k] = torch.tensor(pos_rows[b], dtype=torch.long)
        step_end[b, :k] = torch.tensor(end_rows[b], dtype=torch.long)
        step_mask[b, :k] = True
    return PrmInputs(ids, score_pos, step_end, step_mask)


@dataclass
class RewardModelOutput:
    """scores [B] (orm: the shaped sequence scores) or token_rewards [B, S] (prm); raw: the
    model's own numbers (orm: r_m [B]; prm: step probabilities [B, K] and step_mask [B, K])."""

    scores: torch.Tensor | None
    token_rewards: torch.Tensor | None
    metrics: dict[str, float]
    raw: dict[str, torch.Tensor]


class RewardModel:
    def __init__(self, cfg: RewardModelConfig, layout, groups, *, dtype: torch.dtype, tokenizer, vocab_size: int,
                 pad_id: int) -> None:
        from megarl.models.builder import build_model
        from megarl.models.checkpoint import McoreCheckpoint, is_mcore_checkpoint, load_mcore_checkpoint_into
        from megarl.models.hf_config import arch_spec
        from megarl.models.mappings import iter_safetensors, load_hf_state_into

        self.cfg = cfg
        self.groups = groups
        self.pad_id = pad_id
        path = cfg.path
        if is_mcore_checkpoint(path):
            ckpt = McoreCheckpoint(path)
            spec, head = ckpt.spec, ckpt.head
        elif os.path.isfile(os.path.join(path, "config.json")):
            spec = arch_spec(os.path.join(path, "config.json"))
            head = spec.hf_head
        else:
            raise ValueError(f"reward.model.path {path!r} is neither an HF directory (config.json) nor a megarl "
                             "checkpoint (megarl_checkpoint.json)")
        if head != cfg.kind:
            raise ValueError(f"reward.model.path {path!r} holds a {spec.hf_architecture} with a {head!r} head, but "
                             f"reward.model.kind is {cfg.kind!r}")
        if spec.vocab_size != vocab_size:
            raise ValueError(f"reward.model.path {path!r}: vocab_size {spec.vocab_size} differs from the actor's "
                             f"{vocab_size}; the reward model reads the actor's token ids, so it must share its tokenizer")
        self.chunks = build_model(spec, layout, head=cfg.kind, dtype=dtype, groups=groups)
        if is_mcore_checkpoint(path):
            load_mcore_checkpoint_into(self.chunks, path, groups, spec=spec)
        else:
            load_hf_state_into(self.chunks, spec, layout, iter_safetensors(path))
        for c in self.chunks:
            c.requires_grad_(False)
            c.eval()
        self.separator_id = self.step_token_id = None
        if cfg.kind == "prm":
            self.separator_id = single_token_id(tokenizer, cfg.step_separator, "reward.model.step_separator")
            if cfg.step_token is not None:
                self.step_token_id = single_token_id(tokenizer, cfg.step_token, "reward.model.step_token")
        eos = tokenizer.eos_token_id
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())

    def _forward(self, ids_BS: torch.Tensor, micro_batch_size: int) -> torch.Tensor | None:
        """Head outputs [B, S, n] float32 on the last pipeline stage, None elsewhere."""
        from megarl.trainers.megatron_train import run_microbatches

        S = ids_BS.shape[1]
        pos = torch.arange(S).unsqueeze(0)
        mbs = [{"input_ids": ids_BS[i : i + micro_batch_size],
                "position_ids": pos.expand(len(ids_BS[i : i + micro_batch_size]), S)}
               for i in range(0, len(ids_BS), micro_batch_size)]

        def loss_fn(mb, out):
            return out.new_zeros(()), {"out": out.float().detach()}

        out = run_microbatches(self.chunks, mbs, loss_fn, dp=self.groups.dp, forward_only=True)
        return torch.cat([o["out"] for o in out]) if out else None

    def _from_last_stage(self, t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """The last pipeline stage's tensor on every stage of this pipeline."""
        if self.groups.layout.pp == 1:
            return t
        buf = t.contiguous() if self.groups.is_last_pp_stage else torch.zeros(shape, dtype=torch.float32)
        dist.broadcast(buf, src=self.groups.pp_ranks[-1], group=self.groups.pp_group)
        return buf

    def _dp_mean(self, total: float, count: float) -> float:
        t = torch.tensor([total, count], dtype=torch.float64)
        dist.all_reduce(t, group=self.groups.dp_group)
        return float(t[0] / t[1]) if t[1] > 0 else float("nan")

    def __call__(self, batch, verifier_B: torch.Tensor, micro_batch_size: int) -> RewardModelOutput:
        """batch: rl.RolloutBatch; verifier_B [B]: the reward from reward.terms."""
        from megarl.algorithms.advantages import scores_to_token_rewards
        from megarl.algorithms.rewards import qwen_math_shaping, shape_prm_rewards, step_rewards_to_token_rewards
        from megarl.models.heads import last_token_scores, prm_positive_probs

        B, S = batch.input_ids.shape
        r_v = verifier_B.float()
        if self.cfg.kind == "orm":
            out = self._forward(batch.input_ids, micro_batch_size)
            r_m = None
            if out is not None:
                seq_len = batch.prompt_lengths + batch.response_lengths
                attn = torch.arange(S).unsqueeze(0) < seq_len.unsqueeze(1)
                r_m = last_token_scores(out, attn)
            r_m = self._from_last_stage(r_m, (B,))
            scores = qwen_math_shaping(r_m, r_v, self.cfg.alpha)
            return RewardModelOutput(scores, None, {"rm_score_mean": self._dp_mean(float(r_m.sum()), B)},
                                     {"rm_score": r_m})

        inp = prm_inputs(batch.input_ids, batch.prompt_lengths, batch.response_lengths, self.separator_id,
                         self.step_token_id, self.eos_ids, self.pad_id)
        out = self._forward(inp.input_ids, micro_batch_size)
        probs = None
        if out is not None:
            probs = prm_positive_probs(out).gather(1, inp.score_pos) * inp.step_mask
        probs = self._from_last_stage(probs, tuple(inp.score_pos.shape))
        shaped = shape_prm_rewards(probs, self.cfg.shaping, inp.step_mask) * self.cfg.weight
        token_rewards = (scores_to_token_rewards(r_v, batch.response_mask)
                         + step_rewards_to_token_rewards(shaped, inp.step_end, S, inp.step_mask))
        metrics = {"prm_step_mean": self._dp_mean(float(probs[inp.step_mask].sum()), float(inp.step_mask.sum()))}
        return RewardModelOutput(None, token_rewards, metrics,
                                 {"prm_step_probs": probs, "prm_step_mask": inp.step_mask,
                                  "prm_step_end": inp.step_end, "prm_input_ids": inp.input_ids})
