"""megarl.models.plan and `megarl plan`: the arithmetic by hand on tiny configs, the CLI, and the
estimate against the memory tiny megatron models really take on CPU (docs/plan.md).

The measurements run this file as a script in a child process: the builder enables megarl's
CPU compatibility layer (process-wide patches), and the child needs glibc to give large freed
blocks back to the OS (MALLOC_MMAP_THRESHOLD_) and MKL not to cache its buffers, or the resident
set would not follow the allocations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from megarl.models.plan import (
    GiB,
    KNOWN_MODELS,
    PlanConfig,
    _activation_bytes,
    _Arch,
    _layer_halves,
    _norm_pair,
    _stage_params,
    best_layouts,
    estimate,
    load_arch_config,
)

# d = 8 / 2 = 4; per layer: qkv 8*(2+2*1)*4 = 128 + bias 16, proj 8*8 = 64, SwiGLU 3*8*16 = 384,
# two norms 16 -> 608.
TINY = {"model_type": "qwen2", "hidden_act": "silu", "hidden_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 32,
        "tie_word_embeddings": False, "_source": "tiny"}
BASE = PlanConfig(dp=2, seq_len=16, micro_batch=2, engine="none", runtime_overhead_gib=0,
                  make_vocab_size_divisible_by=1)


def test_weights_grads_optimizer_by_hand():
    r = estimate(TINY, BASE)
    params = 2 * 608 + 32 * 8 + 8 + 32 * 8  # layers, embedding, final norm, untied output
    assert r.params_per_gpu == params == 1736
    c = r.components
    assert c["actor weights"] == 2 * params  # bf16
    assert c["actor grads"] == 4 * params  # fp32 main_grad
    assert c["actor optimizer"] == 12 * (params // 2)  # fp32 master + 2 Adam moments, 1/dp
    assert c["reference weights"] == 2 * params
    replicated = estimate(TINY, dataclasses.replace(BASE, distributed_optimizer=False))
    assert replicated.components["actor optimizer"] == 12 * params
    fp32 = estimate(TINY, dataclasses.replace(BASE, param_dtype="fp32"))
    assert fp32.components["actor optimizer"] == 8 * (params // 2)  # no master copy
    assert "critic weights" not in c and "engine KV cache" not in c


def test_activations_by_hand():
    # T = 32 tokens, bf16 (e = 2), kernels "te", a = 2 heads, k = 1 KV head, d = 4
    norm_pair = 2 * 2 * 8 + 4  # norm input + normalised output + 1/rms
    attn = norm_pair + 2 * ((2 + 1) * 4 + (2 + 2) * 4 + 2 * 4) + 4 * 2  # q,k; pinned QKV; output; lse
    mlp = norm_pair + 2 * 5 * 16
    rope = 4 * 16 * 4 * 2
    layer = (attn + mlp) * 32 + rope
    assert (attn, mlp, layer) == (116, 196, 10496)
    saved = 2 * layer + 8 * 32  # + int64 token ids
    loss = norm_pair * 32 + 8 * 32 * 32 + 2 * 32 * 8  # final norm, fp32 logits + grad, output wgrad
    backward = 2 * (2 * 8 + 4 * 16) * 32 + 2 * 8 * 32  # MLP backward: gradients + fc1 weight grad
    assert loss > backward
    r = estimate(TINY, BASE)
    assert r.components["actor activations"] == r.activations["none"] == saved + loss == 31104
    # full recompute: each layer keeps its input; backward rebuilds one layer
    assert r.activations["full"] == 2 * 2 * 8 * 32 + 8 * 32 + max(loss, backward + layer) == 17408
    assert r.phases["train"] == r.peak_bytes == 3472 + 6944 + 10416 + 3472 + 31104
    # kernels "local": our RMSNorm keeps a float32 upcast; SDPA keeps k and v expanded to all heads
    local = estimate(TINY, dataclasses.replace(BASE, kernels="local"))
    norm_pair = 4 * 8 + 2 * 2 * 8 + 4
    attn = norm_pair + 2 * (3 * 2 * 4 + 2 * 4) + 4 * 2
    mlp = norm_pair + 2 * 5 * 16
    loss = norm_pair * 32 + 8 * 32 * 32 + 2 * 32 * 8
    assert local.activations["none"] == 2 * ((attn + mlp) * 32 + rope) + 8 * 32 + loss == 35712


def test_sequence_parallel_and_tp_split_activations():
    arch = _Arch.from_hf({**TINY, "num_key_value_heads": 2})
    one = PlanConfig(seq_len=16, micro_batch=2)
    attn1, mlp1, _ = _layer_halves(arch, one, "none")
    tp2 = dataclasses.replace(one, tp=2, sequence_parallel=False)
    attn2, mlp2, _ = _layer_halves(arch, tp2, "none")
    sp2 = dataclasses.replace(tp2, sequence_parallel=True)
    attn3, mlp3, _ = _layer_halves(arch, sp2, "none")
    # without SP only the TP-split part halves; with SP the norm/linear inputs halve too
    assert mlp1 - mlp2 == (mlp1 - _norm_pair(arch, one)) / 2
    assert mlp3 == mlp1 / 2 and attn3 == attn1 / 2


def test_stage_params_tp_pp_tied():
    arch = _Arch.from_hf({**TINY, "num_key_value_heads": 2, "num_hidden_layers": 4, "tie_word_embeddings": True})
    # per layer split part: qkv 8*6*4 + 24 bias, proj 64, mlp 384 = 664 -> 332 at tp 2, + norms 16
    plan = PlanConfig(tp=2, pp=2, make_vocab_size_divisible_by=1)
    assert _stage_params(arch, plan, 0, "lm") == 2 * 348 + 32 * 8 // 2
    # the last stage keeps its own copy of the tied output matrix
    assert _stage_params(arch, plan, 1, "lm") == 2 * 348 + 8 + 32 * 8 // 2
    assert _stage_params(arch, plan, 1, "value") == 2 * 348 + 8 + 9  # value head h -> 1
    one_stage = dataclasses.replace(plan, pp=1)
    assert _stage_params(arch, one_stage, 0, "lm") == 4 * 348 + 32 * 8 // 2 + 8  # shared once
    # megatron pads the vocab to a multiple of 128 * tp
    padded = dataclasses.replace(plan, make_vocab_size_divisible_by=128)
    assert _stage_params(arch, padded, 0, "lm") == 2 * 348 + 256 * 8 // 2


def test_pipeline_first_stage_holds_pp_microbatches():
    arch = _Arch.from_hf(TINY)
    plan = dataclasses.replace(BASE, pp=2)
    one_layer = 10496 + 8 * 32  # one layer of test_activations_by_hand + token ids
    assert _activation_bytes(arch, plan, 0, "none", "lm") - _activation_bytes(
        arch, dataclasses.replace(plan, num_microbatches=1), 0, "none", "lm") == one_layer
    # the last stage holds one micro-batch but the logits
    assert _activation_bytes(arch, plan, 1, "none", "lm") == 10496 + 9856


def test_critic_engine_phases_and_kv_cache():
    plan = dataclasses.replace(BASE, engine="sleep", engine_mem_frac=0.5, gpu_memory_gib=1.0, engine_tp=1)
    r = estimate(TINY, plan)
    engine = GiB // 2
    c = r.components
    assert c["engine weights"] == 2 * 1736 and c["engine weights"] + c["engine KV cache"] == engine
    assert r.kv_cache_tokens == (engine - 2 * 1736) // (2 * 2 * 1 * 4 * 2)  # K+V, layers, kv heads, d, bf16
    assert r.phases == {"train": 55408, "rollout": engine + 2 * 3472}
    kept = estimate(TINY, dataclasses.replace(plan, offload_in_rollout=False))
    assert kept.phases["rollout"] == engine + 2 * 3472 + 6944 + 10416
    resident = estimate(TINY, dataclasses.replace(plan, engine="resident"))
    assert resident.phases["train"] == 55408 + engine
    critic = estimate(TINY, dataclasses.replace(BASE, critic=True))
    cc = critic.components
    critic_params = 2 * 608 + 32 * 8 + 8 + 9
    assert cc["critic weights"] == 2 * critic_params and cc["critic optimizer"] == 12 * -(-critic_params // 2)
    assert cc["critic activations"] < cc["actor activations"]  # no vocab logits
    assert critic.phases["train"] == 55408 + 2 * critic_params + 4 * critic_params + cc["critic optimizer"]
    assert not estimate(TINY, dataclasses.replace(plan, gpu_memory_gib=1e-6)).fits


def test_engine_tp_default_divides_the_heads():
    assert PlanConfig(tp=8).effective_engine_tp(12) == 6  # Qwen2.5-Math-1.5B: 12 heads
    assert PlanConfig(tp=2, pp=2).effective_engine_tp(28) == 4
    assert PlanConfig(tp=8, pp=4).effective_engine_tp(64) == 8  # at most one node
    assert PlanConfig(tp=8, engine_tp=2).effective_engine_tp(12) == 2
    with pytest.raises(ValueError, match=r"^engine_tp: 5 must divide"):
        estimate(TINY, dataclasses.replace(BASE, engine="sleep", engine_tp=5))


def test_known_models():
    totals = {}
    for name in KNOWN_MODELS:
        arch = _Arch.from_hf(load_arch_config(name))
        totals[name] = arch.total_params()
        assert arch.tied == (name == "qwen2.5-math-1.5b") and arch.qkv_bias and arch.gated
    assert round(totals["qwen2.5-math-1.5b"] / 1e9, 2) == 1.54
    assert round(totals["qwen2.5-math-7b"] / 1e9, 2) == 7.62
    assert round(totals["qwen2.5-math-72b"] / 1e9, 1) == 72.7


def test_best_layouts_ranking():
    cfg = load_arch_config("qwen2.5-math-7b")
    found = best_layouts(cfg, gpus=8, seq_len=4096, micro_batch=1)
    assert found
    for layout, result in found:
        assert result.fits and result.headroom_bytes >= 8 * GiB
        assert layout.tp * layout.pp * layout.dp == 8 and 28 % layout.tp == 0 and 4 % layout.tp == 0
    keys = [(lo.tp * lo.pp, lo.pp, lo.recompute == "full", not lo.distributed_optimizer) for lo, _ in found]
    assert keys == sorted(keys)
    # the 7B does not fit unsharded next to its reference and the engine
    assert not estimate(cfg, PlanConfig(dp=8)).fits
    assert best_layouts(load_arch_config("qwen2.5-math-72b"), gpus=8, seq_len=4096, micro_batch=1) == []


def test_errors_name_the_field():
    with pytest.raises(ValueError, match=r"^tp: 3 must divide num_attention_heads=2 .* of tiny"):
        estimate(TINY, dataclasses.replace(BASE, tp=3))
    with pytest.raises(ValueError, match=r"^tp: 2 .*num_key_value_heads=1"):
        estimate(TINY, dataclasses.replace(BASE, tp=2))
    with pytest.raises(ValueError, match=r"^pp: 3 must divide num_hidden_layers=2"):
        estimate(TINY, dataclasses.replace(BASE, pp=3))
    with pytest.raises(ValueError, match=r"^recompute: must be one of"):
        PlanConfig(recompute="some")
    with pytest.raises(ValueError, match=r"^engine_mem_frac"):
        PlanConfig(engine_mem_frac=1.5)
    with pytest.raises(ValueError, match=r"^seq_len: must be an int >= 1"):
        PlanConfig(seq_len=0)
    with pytest.raises(ValueError, match=r"unknown keys \['tensor_parallel'\]"):
        PlanConfig.from_dict({"tp": 2, "tensor_parallel": 2})
    assert PlanConfig.from_dict({"tp": 2}).tp == 2


def test_load_arch_config_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a known model"):
        load_arch_config(tmp_path / "nope.json")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({k: v for k, v in TINY.items() if k not in ("hidden_size", "_source")}))
    with pytest.raises(ValueError, match=f"hf config {bad}: missing required field 'hidden_size'"):
        load_arch_config(tmp_path)  # a model directory
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"hf config {bad}: not valid JSON"):
        load_arch_config(bad)
    bad.write_text(json.dumps({**TINY, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads=3"):
        load_arch_config(bad)


def _cli(capsys, *argv):
    from megarl.cli import main

    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_layout_table(capsys):
    rc, out, err = _cli(capsys, "--hf-config", "qwen2.5-math-7b", "--tp", "2", "--dp", "4")
    assert rc == 0 and not err
    expected = estimate(load_arch_config("qwen2.5-math-7b"), PlanConfig(tp=2, dp=4))
    assert expected.fits
    assert f"fits on 80 GB H100: yes (headroom {expected.headroom_bytes / GiB:.2f} GiB)" in out
    for name in ("actor weights (bf16)", "actor optimizer (Adam + fp32 master, 1/4 shard)", "reference weights",
                 "engine KV cache (", "actor activations by recompute (GiB): none", "runtime overhead"):
        assert name in out
    assert "critic" not in out
    rc, out, _ = _cli(capsys, "--hf-config", "qwen2.5-math-7b", "--tp", "4", "--dp", "2", "--critic")
    assert rc == 0 and "critic optimizer" in out and "critic activations (recompute none)" in out
    rc, out, _ = _cli(capsys, "--hf-config", "qwen2.5-math-72b", "--tp", "8")
    assert rc == 0 and "fits on 80 GB H100: no (headroom -" in out
    rc, out, _ = _cli(capsys, "--hf-config", "qwen2.5-math-1.5b", "--dp", "8", "--gpu-memory-gib", "139")
    assert rc == 0 and "fits on 139 GiB GPU: yes" in out


def test_cli_best_layouts(capsys):
    rc, out, err = _cli(capsys)
    assert rc == 0 and not err, err
    for name in KNOWN_MODELS:
        assert f"{name}: " in out
    assert "no layout fits with 8 GiB headroom" in out  # 72B on one node
    rc, out, _ = _cli(capsys, "--hf-config", "qwen2.5-math-1.5b", "--nodes", "1", "--top", "1")
    rows = [line for line in out.splitlines() if line.strip().startswith("1 ")]
    assert rows == [rows[0]] and rows[0].split()[:5] == ["1", "8", "1", "1", "8"]


def test_cli_errors_name_the_flag(capsys):
    rc, _, err = _cli(capsys, "--hf-config", "qwen2.5-math-7b", "--tp", "3")
    assert rc == 2 and "error: --tp: 3 must divide num_attention_heads=28" in err
    rc, _, err = _cli(capsys, "--hf-config", "qwen2.5-math-7b", "--pp", "5")
    assert rc == 2 and "error: --pp: 5 must divide num_hidden_layers=28" in err
    rc, _, err = _cli(capsys, "--hf-config", "qwen2.5-math-7b", "--tp", "1", "--engine-mem-frac", "2")
    assert rc == 2 and "error: --engine-mem-frac: must be in (0, 1)" in err
    rc, _, err = _cli(capsys, "--tp", "2")
    assert rc == 2 and "--hf-config is needed" in err


# ---------------------------------------------------------------------------------------------
# Estimate vs measured memory of tiny models (megarl builder "local" backend, megatron DDP and
# optimizer, the trainer's fused log-prob loss), float32 on CPU.
# ---------------------------------------------------------------------------------------------

# activations dominate (GQA, 1k tokens); the same with full recompute; weights dominate (MHA, tied)
MEASURED_CASES = [
    {"layers": 4, "hidden": 128, "heads": 8, "kv_heads": 2, "ffn": 384, "vocab": 2048, "seq_len": 512,
     "micro_batch": 2, "tied": False, "dist_opt": False, "recompute": "none"},
    {"layers": 4, "hidden": 128, "heads": 8, "kv_heads": 2, "ffn": 384, "vocab": 2048, "seq_len": 512,
     "micro_batch": 2, "tied": False, "dist_opt": True, "recompute": "full"},
    {"layers": 3, "hidden": 384, "heads": 6, "kv_heads": 6, "ffn": 1024, "vocab": 4096, "seq_len": 64,
     "micro_batch": 1, "tied": True, "dist_opt": False, "recompute": "none"},
]
TOLERANCE = 0.15  # |estimate / measured - 1|; docs/plan.md has the measured ratios


def _hf(case: dict) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": case["hidden"], "num_hidden_layers": case["layers"],
            "num_attention_heads": case["heads"], "num_key_value_heads": case["kv_heads"],
            "intermediate_size": case["ffn"], "vocab_size": case["vocab"], "tie_word_embeddings": case["tied"],
            "max_position_embeddings": 4096}


def _plan_for(case: dict, dtype: str = "fp32") -> PlanConfig:
    return PlanConfig(seq_len=case["seq_len"], micro_batch=case["micro_batch"], recompute=case["recompute"],
                      distributed_optimizer=case["dist_opt"], param_dtype=dtype, kernels="local",
                      logprob="fused", reference=False, engine="none", runtime_overhead_gib=0)


def _run_measurements(cases: list[dict], device: str, timeout: float) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", MKL_DISABLE_FAST_MM="1")
    proc = subprocess.run([sys.executable, __file__, device, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


# Saved-tensor accounting of one layer: bf16 and fp32 with GQA, bf16 with MHA (v pins the QKV output)
SAVED_CASES = [dict(MEASURED_CASES[0], layers=2, seq_len=64, kind="saved", dtype=dt) for dt in ("bf16", "fp32")]
SAVED_CASES.append(dict(MEASURED_CASES[2], layers=2, kind="saved", dtype="bf16"))


@pytest.fixture(scope="module")
def cpu_measurements() -> list[dict]:
    """All CPU cases in one child process (megatron is imported once, ~5 s)."""
    return _run_measurements(MEASURED_CASES + SAVED_CASES, "cpu", timeout=600)


def test_estimate_matches_measured_memory_cpu(cpu_measurements):
    for case, res in zip(MEASURED_CASES, cpu_measurements):
        est = estimate(_hf(case), _plan_for(case))
        assert res["params"] == est.params_per_gpu
        ratio = est.peak_bytes / res["peak"]
        assert abs(ratio - 1) <= TOLERANCE, (case, res, est.peak_bytes, ratio)


def test_saved_tensors_match_layer_formula(cpu_measurements):
    """The per-layer bytes kept for backward against saved_tensors_hooks of a real forward
    (exact storage accounting, no allocator noise)."""
    for case, res in zip(SAVED_CASES, cpu_measurements[len(MEASURED_CASES):]):
        arch = _Arch.from_hf(_hf(case))
        attn, mlp, rope = _layer_halves(arch, _plan_for(case, case["dtype"]), "none")
        tokens = case["seq_len"] * case["micro_batch"]
        assert res["layer_bytes"] == pytest.approx((attn + mlp) * tokens + rope, rel=1e-3), case


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_estimate_matches_measured_memory_gpu():
    cases = [dict(c, dtype="bf16") for c in MEASURED_CASES]
    results = _run_measurements(cases, "cuda", timeout=600)
    for case, res in zip(cases, results):
        est = estimate(_hf(case), _plan_for(case, "bf16"))
        ratio = est.peak_bytes / res["peak"]
        assert abs(ratio - 1) <= 0.25, (case, res, est.peak_bytes, ratio)


# ---------------------------------------------------------------------------------------------
# The measuring child process: python test_plan.py {cpu|cuda} '<cases json>'
# ---------------------------------------------------------------------------------------------


def _measure_case(case: dict, device: str) -> dict:
    import functools
    import gc

    import megatron.core.optimizer as megatron_optimizer
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megarl.models.builder import build_model
    from megarl.models.hf_config import arch_spec
    from megarl.ops import logprob_entropy
    from megarl.parallel.groups import ParallelLayout, init_parallel, single_process_world
    from megarl.procmem import reset_peak, status_bytes

    # What TE's FusedAdam is on GPU: an in-place step (megatron's torch fallback makes per-tensor
    # temporaries that a GPU run would not have).
    megatron_optimizer.Adam = functools.partial(torch.optim.AdamW, fused=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.get("dtype", "fp32")]
    overrides = {}
    if case["recompute"] == "full":
        overrides = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif case["recompute"] == "selective":
        overrides = dict(recompute_granularity="selective")
    layout = ParallelLayout()
    with single_process_world():
        groups = init_parallel(layout, seed=1)

        def build(cfg: dict):
            (model,) = build_model(arch_spec(cfg), layout, dtype=dtype, groups=groups, backend="local", **overrides)
            if device == "cuda":
                model.cuda()
            return model

        def batch(cfg: dict, b: int, s: int):
            ids = torch.randint(0, cfg["vocab_size"], (b, s), device=device)
            return ids, torch.arange(s, device=device).expand(b, s)

        if case.get("kind") == "saved":
            model = build(_hf(case))
            ids, pos = batch(_hf(case), case["micro_batch"], case["seq_len"])
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            layer = model.decoder.layers[0]
            saved: dict[int, int] = {}
            inside = []
            layer.register_forward_pre_hook(lambda *a: inside.append(1))
            layer.register_forward_hook(lambda *a: (inside.pop(), None)[1])

            def pack(t):
                storage = t.untyped_storage()
                if inside and storage.data_ptr() not in params:
                    saved[storage.data_ptr()] = storage.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(ids, pos, attention_mask=None)
            return {"layer_bytes": sum(saved.values())}

        def wrap(model):
            model = DistributedDataParallel(model.config, DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=case["dist_opt"]), model)
            opt = get_megatron_optimizer(OptimizerConfig(
                optimizer="adam", lr=1e-4, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                use_distributed_optimizer=case["dist_opt"]), [model])
            return model, opt

        def step(model, opt, ids, pos):
            # the trainer's loss path: logits -> float32 -> fused log-prob/entropy
            model.zero_grad_buffer()
            opt.zero_grad()
            logits = model(ids, pos, attention_mask=None)
            b, s, v = logits.shape
            logp, ent = logprob_entropy(logits.float().reshape(b * s, v), ids.reshape(-1))
            del logits
            loss = -(logp.mean() + 0.01 * ent.mean())
            loss.backward()
            del loss, logp, ent
            model.finish_grad_sync()
            opt.step()

        # one-time allocations (thread pools, kernel scratch, autograd engine) before the baseline
        warm = {**_hf(case), "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 128}
        step(*wrap(build(warm)), *batch(warm, 1, 16))
        gc.collect()
        cfg = _hf(case)
        ids, pos = batch(cfg, case["micro_batch"], case["seq_len"])
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak()  # VmHWM := VmRSS
            base = status_bytes("VmRSS")
        model, opt = wrap(build(cfg))
        for _ in range(2):  # the second step runs with the optimizer state allocated
            step(model, opt, ids, pos)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = status_bytes("VmHWM") - base
        return {"peak": peak, "params": sum(p.numel() for p in model.parameters())}


def _measure_main(device: str, cases: list[dict]) -> None:
    """Each case in a forked child (megatron imported once, here), so no case sees another's
    allocations; results as one JSON line."""
    import megatron.core.models.gpt  # noqa: F401

    results = []
    for case in cases:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_fd)
            try:
                out = _measure_case(case, device)
            except BaseException as e:  # reported to the parent, which fails the test
                import traceback

                traceback.print_exc()
                out = {"error": repr(e)}
            os.write(write_fd, json.dumps(out).encode())
            os._exit(0)
        os.close(write_fd)
        data = b""
        while chunk := os.read(read_fd, 1 << 16):
            data += chunk
        os.close(read_fd)
        os.waitpid(pid, 0)
        result = json.loads(data)
        if "error" in result:
            raise SystemExit(f"case {case}: {result['error']}")
        results.append(result)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    _measure_main(sys.argv[1], json.loads(sys.argv[2]))
