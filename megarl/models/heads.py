"""Model heads that replace megatron GPTModel's output layer, and the pure functions that read
their outputs.

- "lm": megatron's own vocab-parallel output layer (actor, reference).
- "value": Linear(h, 1) per token (critic). HF export: {Qwen2,Llama}ForTokenClassification
  with num_labels=1 (`score.weight`, `score.bias`).
- "orm": Linear(h, h), ReLU, Linear(h, 1), as Qwen2.5-Math-RM (`score.0`, `score.2`); the
  sequence score is the value at the last non-pad token (`last_token_scores`).
- "prm": Linear(h, h), ReLU, Linear(h, 2), as Qwen2.5-Math-PRM; a step's score is
  softmax(logits)[..., 1] at each step-separator token (`prm_step_scores`).

The head parameters are replicated on the tensor-parallel ranks (they are small next to a
transformer layer; Qwen2.5-Math-RM-72B's Linear(8192, 8192) is 67M parameters). Under sequence
parallelism the head first gathers the full sequence, so every TP rank computes the same output
and gets the same parameter gradients: no extra TP all-reduce is needed.

A head module keeps its last linear as `weight`/`bias` (and the hidden linear as `hidden`), so
the GPTModel keeps an `output_layer.weight` as megatron's checkpointing code expects.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_OUTPUTS = {"value": 1, "orm": 1, "prm": 2}


def _megatron_module():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


def make_head(kind: str, config, tp_group=None) -> nn.Module:
    """The output-layer replacement for head `kind` ("value" | "orm" | "prm").

    Weights are drawn from the CPU generator (normal, std=config.init_method_std; biases 0) and
    then broadcast from the first rank of `tp_group`, so tensor-parallel replicas are identical
    whatever generator state each rank had.
    """
    if kind not in HEAD_OUTPUTS:
        raise ValueError(f"head must be one of {sorted(HEAD_OUTPUTS)} (or 'lm'), got {kind!r}")
    head = _build_head_class()(config, HEAD_OUTPUTS[kind], hidden_layer=kind in ("orm", "prm"), tp_group=tp_group)
    head.kind = kind
    return head


_HEAD_CLASS = None


def _build_head_class():
    # Defined lazily so that importing this module needs torch only.
    global _HEAD_CLASS
    if _HEAD_CLASS is not None:
        return _HEAD_CLASS
    MegatronModule = _megatron_module()

    class ScoreHead(MegatronModule):
        """hidden [s, b, h] -> scores [s, b, num_outputs] (then GPTModel returns [b, s, n])."""

        def __init__(self, config, num_outputs: int, *, hidden_layer: bool, tp_group=None):
            super().__init__(config=config)
            h = config.hidden_size
            device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
            dtype = config.params_dtype
            self.tp_group = tp_group
            self.hidden = nn.Linear(h, h, bias=True, device=device, dtype=dtype) if hidden_layer else None
            self.weight = nn.Parameter(torch.empty(num_outputs, h, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_outputs, device=device, dtype=dtype))
            self.reset_parameters()

        @torch.no_grad()
        def reset_parameters(self) -> None:
            std = self.config.init_method_std
            params = [self.weight] + ([self.hidden.weight] if self.hidden is not None else [])
            for p in params:
                cpu = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std)
                p.copy_(cpu.to(p.dtype))
            self.bias.zero_()
            if self.hidden is not None:
                self.hidden.bias.zero_()
            group = self.tp_group
            if group is not None and group.size() > 1 and torch.distributed.is_initialized():
                src = torch.distributed.get_process_group_ranks(group)[0]
                for p in self.parameters():
                    torch.distributed.broadcast(p.data, src=src, group=group)

        def forward(self, hidden_states, weight=None, runtime_gather_output=None):
            # Same call signature as ColumnParallelLinear, which GPTModel calls.
            if self.config.sequence_parallel:
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                # Each TP rank then computes the same scores from the same full sequence, so the
                # backward only needs to split the (identical) gradient, not reduce-scatter it.
                hidden_states = gather_from_sequence_parallel_region(
                    hidden_states, tensor_parallel_output_grad=False, group=self.tp_group
                )
            x = hidden_states
            if self.hidden is not None:
                x = torch.relu(self.hidden(x))
            return nn.functional.linear(x, self.weight, self.bias), None

    _HEAD_CLASS = ScoreHead
    return ScoreHead


def head_kind(chunk) -> str | None:
    """The head of a model chunk: "lm", "value", "orm", "prm", or None (no output layer)."""
    if not getattr(chunk, "post_process", False):
        return None
    return getattr(chunk.output_layer, "kind", "lm")


# ---- pure functions over head outputs ---------------------------------------------------------


def values_from_output(output_BS1: torch.Tensor) -> torch.Tensor:
    """Value-head model output [B, S, 1] -> values [B, S]."""
    if output_BS1.dim() != 3 or output_BS1.size(-1) != 1:
        raise ValueError(f"value head output must be [B, S, 1], got {tuple(output_BS1.shape)}")
    return output_BS1.squeeze(-1)


def last_token_index(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row [B] (works for left and right padding).

    Shape: attention_mask_BS [B, S] (1/True = real token) -> [B] int64.
    """
    if attention_mask_BS.dim() != 2:
        raise ValueError(f"attention_mask must be [B, S], got {tuple(attention_mask_BS.shape)}")
    mask = attention_mask_BS.bool()
    if not bool(mask.any(dim=1).all()):
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {empty} have no tokens")
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=1)


def last_token_scores(scores_BS1: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Outcome reward: the ORM score at each sequence's last non-pad token.

    Shape: scores_BS1 [B, S, 1] or [B, S]; attention_mask_BS [B, S] -> [B].
    Equals Qwen2.5-Math-RM's pooling for right-padded batches (last token before the padding).
    """
    scores_BS = scores_BS1.squeeze(-1) if scores_BS1.dim() == 3 else scores_BS1
    if scores_BS.shape != attention_mask_BS.shape:
        raise ValueError(
            f"scores {tuple(scores_BS.shape)} and attention_mask {tuple(attention_mask_BS.shape)} differ"
        )
    idx_B = last_token_index(attention_mask_BS)
    return scores_BS.gather(1, idx_B.unsqueeze(1)).squeeze(1)


def prm_positive_probs(logits_BS2: torch.Tensor) -> torch.Tensor:
    """P(step is correct) at every position: softmax(logits)[..., 1], in float32.

    Shape: logits_BS2 [B, S, 2] -> [B, S].
    """
    if logits_BS2.size(-1) != 2:
        raise ValueError(f"PRM logits must have 2 classes in the last dim, got {tuple(logits_BS2.shape)}")
    return torch.softmax(logits_BS2.float(), dim=-1)[..., 1]


def prm_step_scores(
    logits_BS2: torch.Tensor, input_ids_BS: torch.Tensor, step_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Process reward at each step separator (Qwen2.5-Math-PRM uses "<extra_0>", id 151651).

    Shape: logits_BS2 [B, S, 2], input_ids_BS [B, S] ->
      (probs_BS [B, S] float32, zero off separators; step_mask_BS [B, S] bool).
    `step_scores_list` turns this into one tensor of step scores per sequence.
    """
    if logits_BS2.shape[:2] != input_ids_BS.shape:
        raise ValueError(
            f"PRM logits {tuple(logits_BS2.shape)} do not match input_ids {tuple(input_ids_BS.shape)}"
        )
    step_mask_BS = input_ids_BS == step_token_id
    probs_BS = prm_positive_probs(logits_BS2).masked_fill(~step_mask_BS, 0.0)
    return probs_BS, step_mask_BS


def step_scores_list(probs_BS: torch.Tensor, step_mask_BS: torch.Tensor) -> list[torch.Tensor]:
    """Per-sequence step scores [n_steps_b] from `prm_step_scores`' output."""
    return [probs_BS[b][step_mask_BS[b]] for b in range(probs_BS.size(0))]

