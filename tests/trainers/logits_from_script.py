"""Child process of test_batch.py: the update's log-probs and gradients are the same whether the
LM head computes logits for every position or only from the first response position."""

import os
import sys

import torch

from megarl.models.builder import build_model
from megarl.models.hf_config import arch_spec
from megarl.models.mappings import iter_safetensors, load_hf_state_into
from megarl.parallel.groups import ParallelLayout, init_parallel, single_process_world
from megarl.rollout import Completion
from megarl.trainers.megatron_train import run_microbatches, wrap_for_training
from megarl.trainers.rl import _tokens_logprobs, build_batch, microbatches, scatter_rows


def main(hf_dir: str) -> None:
    torch.manual_seed(0)
    with single_process_world():
        layout = ParallelLayout(tp=1, pp=1)
        groups = init_parallel(layout, seed=1)
        spec = arch_spec(os.path.join(hf_dir, "config.json"))
        chunks = build_model(spec, layout, groups=groups)
        load_hf_state_into(chunks, spec, layout, iter_safetensors(hf_dir))
        actor = wrap_for_training(chunks, groups, lr=1e-3, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
                                  clip_grad=0.0, use_distributed_optimizer=False)
        prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]
        comps = [Completion(i // 2, [20 + i, 21, 22][: 1 + i % 3], "", None, "stop") for i in range(4)]
        batch = build_batch(prompts, comps, pad_id=0, n=2)
        B, S = batch.input_ids.shape
        adv = torch.randn(B, 1).expand(B, S).contiguous()
        results = []
        for skip in (False, True):
            mbs = microbatches(batch, torch.arange(B), 2, trim_to=1, skip_prompt_logits=skip, adv=adv)
            assert ("logits_from" in mbs[0]) == skip, mbs[0].keys()

            def loss_fn(mb, logits, skip=skip):
                # with logits_from the LM head ran on the positions from the first response token
                assert logits.shape[1] == mb["input_ids"].shape[1] - mb.get("logits_from", 0), logits.shape
                assert (logits.shape[1] < mb["input_ids"].shape[1]) == skip
                logp, _ = _tokens_logprobs(logits.float(), mb, 1.0, None)
                loss = -(logp * mb["adv"] * mb["mask"]).sum() / batch.response_mask.sum()
                return loss, {"logp": logp.detach()}

            for c in actor.chunks:
                c.train()
                c.zero_grad_buffer()
            outs = run_microbatches(actor.chunks, mbs, loss_fn, dp=1, forward_only=False)
            logp = scatter_rows([o["logp"] for o in outs], mbs, B, S) * batch.response_mask
            grads = torch.cat([p.main_grad.flatten().clone() for p in actor.modules[0].parameters()])
            results.append((logp, grads))
        (l0, g0), (l1, g1) = results
        assert torch.allclose(l0, l1, atol=1e-6), (l0 - l1).abs().max()
        assert g0.abs().sum() > 0
        assert torch.allclose(g0, g1, rtol=1e-5, atol=1e-7), (g0 - g1).abs().max()
        print("OK logits_from", float((g0 - g1).abs().max()))


if __name__ == "__main__":
    main(sys.argv[1])
