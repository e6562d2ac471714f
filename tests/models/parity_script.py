"""Logits parity of megatron models built by megarl against transformers, under TP/PP/VPP.

Run by tests/models/test_model_parity.py as ONE launch:
    torchrun --standalone --nproc_per_node=4 tests/models/parity_script.py OUT.json [--smollm2]

For each layout (re-initialising megatron's parallel state between layouts) and each model it
builds the megatron chunks, loads the HF weights through megarl.models.mappings, runs a
forward-only pipeline schedule and compares the last stage's logits with transformers' (float32,
eager attention) on the same tokens. It also exports every megatron shard back to HF names
(export_hf_tensors / mcore_to_hf) and checks the round trip is exact, checks that megatron's
layer numbering equals mappings.global_layer, and for the value model runs a backward through the pipeline schedule
and compares the exported gradients with transformers'; megatron's legacy static inference
engine generates greedily from the tied Qwen2 model (layouts without VPP/SP). Rank 0 writes all
measurements to OUT.json; the test asserts on them.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

from megarl.models.builder import build_model
from megarl.models.hf_config import arch_spec, padded_vocab_size
from megarl.models.mappings import (
    export_hf_tensors,
    global_layer,
    hf_names,
    iter_safetensors,
    load_hf_state_into,
    mcore_to_hf,
    to_global_name,
)
from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_distributed, init_parallel

LAYOUTS = [
    ParallelLayout(tp=1, pp=1),
    ParallelLayout(tp=2, pp=1),
    ParallelLayout(tp=1, pp=2),
    ParallelLayout(tp=2, pp=2),
    ParallelLayout(tp=1, pp=2, vpp=2),
    ParallelLayout(tp=2, pp=2, vpp=2),
    ParallelLayout(tp=2, pp=2, sequence_parallel=True),
]
SEQ = 12
TOLERANCE = 1e-4
NUM_MB, MBS = 2, 2  # interleaved pipelining wants microbatches divisible by pp


def layout_name(layout: ParallelLayout) -> str:
    name = f"tp{layout.tp}pp{layout.pp}"
    if layout.vpp:
        name += f"vpp{layout.vpp}"
    if layout.sequence_parallel:
        name += "sp"
    return name


def _randomise(model, seed: int) -> None:
    """Non-trivial norms and biases, so a swapped or dropped tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def tiny_models():
    """(name, hf_model, head, reference fn ids -> output) for the random tiny models."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2ForTokenClassification

    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, initializer_range=0.2, max_position_embeddings=256)
    out = []

    def make(cls, cfg, seed):
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = cls(cfg).float().eval()
        _randomise(model, seed)
        return model

    m = make(Qwen2ForCausalLM, Qwen2Config(vocab_size=1000, tie_word_embeddings=True,
                                           architectures=["Qwen2ForCausalLM"], **common), 1)
    out.append(("qwen2-tied", m, "lm", lambda ids, m=m: m(ids).logits))
    m = make(Qwen2ForCausalLM, Qwen2Config(vocab_size=1100, tie_word_embeddings=False, rope_theta=1e6,
                                           architectures=["Qwen2ForCausalLM"], **common), 2)
    out.append(("qwen2-untied", m, "lm", lambda ids, m=m: m(ids).logits))
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    m = make(LlamaForCausalLM, LlamaConfig(vocab_size=1000, tie_word_embeddings=False, rope_theta=500000.0,
                                           rope_scaling=rope, architectures=["LlamaForCausalLM"], **common), 3)
    out.append(("llama-llama3rope", m, "lm", lambda ids, m=m: m(ids).logits))
    m = make(Qwen2ForTokenClassification, Qwen2Config(vocab_size=1000, num_labels=1,
                                                      architectures=["Qwen2ForTokenClassification"], **common), 4)
    out.append(("qwen2-value", m, "value", lambda ids, m=m: m(ids).logits))
    # Qwen2.5-Math-PRM's class is remote code: the reference is Qwen2Model + the same MLP head.
    body = make(Qwen2ForCausalLM, Qwen2Config(vocab_size=1000, architectures=["Qwen2ForCausalLM"], **common), 5)
    g = torch.Generator().manual_seed(5)
    score = {
        "score.0.weight": 0.2 * torch.randn(64, 64, generator=g), "score.0.bias": 0.2 * torch.randn(64, generator=g),
        "score.2.weight": 0.2 * torch.randn(2, 64, generator=g), "score.2.bias": 0.2 * torch.randn(2, generator=g),
    }

    def prm_ref(ids, body=body, s=score):
        h = body.model(ids).last_hidden_state
        h = torch.relu(h @ s["score.0.weight"].T + s["score.0.bias"])
        return h @ s["score.2.weight"].T + s["score.2.bias"]

    prm_config = body.config.to_dict() | {"architectures": ["Qwen2ForProcessRewardModel"], "num_labels": 2}
    state = {k: v for k, v in body.state_dict().items() if not k.startswith("lm_head.")} | score
    out.append(("qwen2-prm", (prm_config, state), "prm", prm_ref))
    return out


def pipeline_forward(chunks, groups, ids_MBS: torch.Tensor) -> torch.Tensor | None:
    """Forward-only pipeline schedule; on the last stage returns full-vocab outputs
    [num_mb * mbs, S, V] (TP shards gathered), elsewhere None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    num_mb, mbs, seq = ids_MBS.shape

    def step(data_iter, model):
        ids = next(data_iter)
        pos = torch.arange(seq).unsqueeze(0).expand_as(ids)
        out = model(ids, pos, None)
        return out, lambda output, non_loss_data=False: output.detach()

    batches = list(ids_MBS)
    data = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=data, model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=num_mb, seq_length=seq, micro_batch_size=mbs,
            forward_only=True, collect_non_loss_data=True,
        )
    if not groups.is_last_pp_stage:
        return None
    local = torch.cat(outs, dim=0)
    head = chunks[-1].megarl_head
    if head != "lm" or groups.layout.tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(groups.layout.tp)]
    dist.all_gather(parts, local.contiguous(), group=groups.tp_group)
    return torch.cat(parts, dim=-1)


def value_loss_weights(shape) -> torch.Tensor:
    """Fixed per-token weights W: loss = sum(values * W) / num_microbatches."""
    return torch.linspace(-0.5, 1.0, shape[0] * shape[1]).reshape(shape)


def grad_errors(chunks, groups, spec, layout, hf_model, ids_MBS: torch.Tensor) -> tuple[int, list[str]]:
    """Backward through the pipeline schedule for a value model; the gradients, exported with
    mcore_to_hf, must equal transformers' for the same loss. Under sequence parallelism the
    norm weights (flagged `sequence_parallel`) get megatron's TP all-reduce, as
    finalize_model_grads would do."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    num_mb, mbs, seq = ids_MBS.shape
    weights = value_loss_weights((num_mb * mbs, seq))
    batches = [(ids_MBS[i], weights[i * mbs : (i + 1) * mbs]) for i in range(num_mb)]

    def step(data_iter, model):
        ids, w = next(data_iter)
        pos = torch.arange(seq).unsqueeze(0).expand_as(ids)
        out = model(ids, pos, None)
        return out, lambda output: ((output.squeeze(-1) * w).sum(), {})

    for c in chunks:
        c.zero_grad(set_to_none=True)
    data = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    get_forward_backward_func()(
        forward_step_func=step, data_iterator=data, model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_mb, seq_length=seq, micro_batch_size=mbs, forward_only=False,
    )
    hf_model.zero_grad(set_to_none=True)
    out = hf_model(ids_MBS.reshape(-1, seq)).logits.squeeze(-1)
    ((out * weights).sum() / num_mb).backward()
    hf_grads = {n: p.grad for n, p in hf_model.named_parameters()}
    compared, bad = 0, []
    for c in chunks:
        vp = c.vp_stage or 0
        for local, p in c.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if layout.sequence_parallel and getattr(p, "sequence_parallel", False):
                dist.all_reduce(g, group=groups.tp_group)
            shards = [torch.empty_like(g) for _ in range(layout.tp)]
            if layout.tp > 1:
                dist.all_gather(shards, g.contiguous(), group=groups.tp_group)
            else:
                shards = [g]
            name = to_global_name(spec, layout, groups.pp_rank, vp, local)
            for hf_name, t in mcore_to_hf(spec, name, shards, "value"):
                compared += 1
                want = hf_grads[hf_name]
                err = (t - want).abs().max().item()
                if err > TOLERANCE * want.abs().max().item() + 1e-7:
                    bad.append(f"{hf_name}: grad max diff {err:.3g} vs max {want.abs().max().item():.3g}")
    return compared, bad


class _IdTokenizer:
    """Token ids written as text: what megatron's text generation controller needs."""

    eod, bos = 999, None

    def tokenize(self, text):
        return [int(x) for x in text.split()]

    def detokenize(self, ids, **kwargs):
        return " ".join(str(int(i)) for i in ids)


ENGINE_PROMPTS = ["5 17 33 2 9", "100 4 8"]
ENGINE_NEW_TOKENS = 6


def static_engine_tokens(chunks, spec, layout) -> list[list[int]]:
    """Greedy tokens from megatron's legacy StaticInferenceEngine (PP broadcasts go through the
    compat layer's relaxed _is_cuda)."""
    from megatron.core.inference.engines.static_engine import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    (model,) = chunks
    cfg = InferenceWrapperConfig(hidden_size=spec.hidden_size, params_dtype=torch.float32,
                                 inference_batch_times_seqlen_threshold=1000,
                                 padded_vocab_size=padded_vocab_size(spec, layout.tp), inference_max_requests=4,
                                 inference_max_seq_length=64)
    engine = StaticInferenceEngine(TextGenerationController(GPTInferenceWrapper(model, cfg), _IdTokenizer()),
                                   max_batch_size=4, legacy=True)
    results = engine.generate(prompts=ENGINE_PROMPTS,
                              sampling_params=SamplingParams(top_k=1, num_tokens_to_generate=ENGINE_NEW_TOKENS))
    return [list(map(int, r.generated_tokens)) for r in results]


def roundtrip(chunks, groups, spec, layout, hf_state, head) -> tuple[int, list[str], list[str]]:
    """Export this rank's shards to HF names (mappings.export_hf_tensors); (tensors compared,
    mismatches, HF names covered). Also checks the replicated head is equal on all TP ranks."""
    compared, bad, covered = 0, [], []
    for hf_name, t in export_hf_tensors(chunks, spec, layout):
        compared += 1
        covered.append(hf_name)
        if not torch.equal(t, hf_state[hf_name].to(t.dtype)):
            bad.append(f"{hf_name}: max diff {(t - hf_state[hf_name]).abs().max().item():.3g}")
    if head != "lm" and layout.tp > 1 and groups.is_last_pp_stage:
        for name, p in chunks[-1].output_layer.named_parameters():
            shards = [torch.empty_like(p) for _ in range(layout.tp)]
            dist.all_gather(shards, p.detach().contiguous(), group=groups.tp_group)
            if any(not torch.equal(s, shards[0]) for s in shards):
                bad.append(f"output_layer.{name}: head replicas differ across TP ranks")
    return compared, bad, covered


def layer_numbering_errors(chunks, groups, spec, layout) -> list[str]:
    errs = []
    for c in chunks:
        vp = c.vp_stage or 0
        for local, layer in enumerate(c.decoder.layers):
            want = global_layer(spec, layout, groups.pp_rank, vp, local)
            if layer.layer_number - 1 != want:
                errs.append(f"pp{groups.pp_rank} vp{vp} local {local}: megatron {layer.layer_number - 1}, ours {want}")
    return errs


def main() -> int:
    out_path = sys.argv[1]
    with_smollm2 = "--smollm2" in sys.argv
    torch.set_num_threads(1)
    rank, world = init_distributed()
    assert world == 4, "run with --nproc_per_node=4"
    t_start = time.time()

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (NUM_MB, MBS, SEQ))
    models = []
    for name, model, head, ref_fn in tiny_models():
        if isinstance(model, tuple):
            cfg, state = model
        else:
            cfg, state = model.config.to_dict(), dict(model.state_dict())
        with torch.no_grad():
            ref = ref_fn(ids.reshape(-1, SEQ))
        if name == "qwen2-tied":
            engine_ref = []
            for prompt in ENGINE_PROMPTS:
                p_ids = torch.tensor([[int(x) for x in prompt.split()]])
                with torch.no_grad():
                    out = model.generate(p_ids, max_new_tokens=ENGINE_NEW_TOKENS, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)
                engine_ref.append(out[0, p_ids.shape[1]:].tolist())
        models.append(dict(name=name, spec=arch_spec(cfg), head=head, state=state, ref=ref, ids=ids,
                           tensors=lambda state=state: state.items(),
                           hf=model if name == "qwen2-value" else None))

    if with_smollm2:
        from megarl.models.packaged import smollm2_hf_dir

        path = smollm2_hf_dir() if rank == 0 else None
        box = [str(path)]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
        spec = arch_spec(path)
        seq = 16
        if rank == 0:
            from transformers import AutoTokenizer, LlamaForCausalLM

            tok = AutoTokenizer.from_pretrained(path)
            texts = ["What is 12 times 13? Let me think step by step: 12 times 13 is 12 times 10 plus 12 times 3.",
                     "The capital of France is Paris, and the capital of Italy is Rome. The capital of Spain is",
                     "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)",
                     "Once upon a time, in a small village by the sea, there lived an old fisherman who"]
            sm_ids = torch.stack([torch.tensor(tok(t)["input_ids"][:seq]) for t in texts]).reshape(NUM_MB, MBS, seq)
            hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
            with torch.no_grad():
                sm_ref = hf(sm_ids.reshape(-1, seq)).logits
            state = dict(hf.state_dict())
            del hf
        else:
            sm_ids = torch.empty(NUM_MB, MBS, seq, dtype=torch.long)
            sm_ref = torch.empty(NUM_MB * MBS, seq, spec.vocab_size)
            state = None
        dist.broadcast(sm_ids, src=0)
        dist.broadcast(sm_ref, src=0)
        models.append(dict(name="smollm2-135m", spec=spec, head="lm", state=state, ref=sm_ref, ids=sm_ids,
                           tensors=lambda path=path: iter_safetensors(path), real=True))

    records = []
    t_layouts = {}
    for layout in LAYOUTS:
        t0 = time.time()
        groups = init_parallel(layout, seed=1234)
        for m in models:
            spec, head = m["spec"], m["head"]
            if m.get("real") and (layout.tp > 1 or layout.vpp):
                continue  # SmolLM2 has 9 heads / 3 KV heads: TP=2 does not divide it
            if m.get("real") and groups.dp_rank != 0:
                continue  # one data-parallel replica suffices for the 135M model (time, memory)
            rec = dict(model=m["name"], layout=layout_name(layout), rank=rank, pp_rank=groups.pp_rank,
                       tp_rank=groups.tp_rank, dp_rank=groups.dp_rank)
            t1 = time.time()
            # the weights are loaded next: skip megatron's random init (a full CPU master weight per rank)
            chunks = build_model(spec, layout, head=head, groups=groups, perform_initialization=False)
            for c in chunks:
                c.eval()
            counts = load_hf_state_into(chunks, spec, layout, m["tensors"]())
            rec["loaded"] = counts["loaded"]
            rec["layer_numbering_errors"] = layer_numbering_errors(chunks, groups, spec, layout)
            out = pipeline_forward(chunks, groups, m["ids"])
            if out is not None and groups.tp_rank == 0:
                vocab = m["ref"].shape[-1]
                real, ref = out[..., :vocab], m["ref"]
                rec["max_abs_diff"] = (real - ref).abs().max().item()
                rec["max_abs_ref"] = ref.abs().max().item()
                rec["ratio"] = rec["max_abs_diff"] / rec["max_abs_ref"]
                rec["argmax_equal"] = bool(torch.equal(real.argmax(-1), ref.argmax(-1)))
                if head == "lm":
                    padded = padded_vocab_size(spec, layout.tp)
                    rec["padded_vocab"] = padded
                    rec["output_vocab"] = out.shape[-1]
                    if padded > spec.vocab_size:
                        pad = out[..., spec.vocab_size:]
                        probs = torch.softmax(out, dim=-1)[..., spec.vocab_size:]
                        rec["pad_logits_are_min"] = bool((pad == torch.finfo(out.dtype).min).all())
                        rec["pad_prob_max"] = probs.max().item()
            if m.get("state") is not None:
                compared, bad, covered = roundtrip(chunks, groups, spec, layout, m["state"], head)
                rec["roundtrip_compared"], rec["roundtrip_errors"], rec["covered"] = compared, bad, sorted(set(covered))
            if m["name"] == "qwen2-tied" and layout.vpp is None and not layout.sequence_parallel:
                rec["engine_tokens"] = static_engine_tokens(chunks, spec, layout)
            if m.get("hf") is not None:
                rec["grad_compared"], rec["grad_errors"] = grad_errors(chunks, groups, spec, layout, m["hf"], m["ids"])
            rec["seconds"] = round(time.time() - t1, 3)
            records.append(rec)
            del chunks
        destroy_parallel()
        t_layouts[layout_name(layout)] = round(time.time() - t0, 2)

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank == 0:
        flat = [r for rs in gathered for r in rs]
        expected = {m["name"]: hf_names(m["spec"], m["head"]) for m in models}
        result = dict(records=flat, expected_hf_names=expected, layout_seconds=t_layouts, engine_ref=engine_ref,
                      total_seconds=round(time.time() - t_start, 2))
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        import os

        os.replace(tmp, out_path)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
