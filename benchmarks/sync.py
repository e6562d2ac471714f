"""Weight sync (megatron trainer -> rollout engine) vs a plain memcpy of the same bytes, one run.

    python benchmarks/sync.py                          # SmolLM2-135M and a random Qwen2.5-1.5B
    python benchmarks/sync.py --models smollm2-135m    # one model
    python benchmarks/sync.py --quick                  # a tiny random model (smoke run)
    python benchmarks/sync.py --threads 1              # one torch thread (steadier on a loaded box)

Trainer: megatron-core GPTModel at TP1 PP1 in this process (float32 on CPU, bf16 on GPU).
Engine: HFEngine (transformers) holding the same architecture, the colocated HF-layout case;
for SmolLM2 also a MegatronEngine over its own copy of the model (the shard fast path).
Rows:
  memcpy      every trainer parameter copied into a warm buffer: the bandwidth bound for
              moving these bytes once;
  sync        WeightBridge.sync with per-tensor checksums on both sides, no probe;
  no checksum the same without checksums (what verification costs);
  probe       one log-prob probe (4 x 24 tokens) on top of a sync.
Each ratio is given in wall time and in this process's CPU time (the work, where a loaded shared
machine makes wall time mostly waiting for a core). Peak extra memory is measured around one sync (see _harness.peak_extra_bytes) and compared with
the bucket size. The CPU target is sync within 3x of memcpy; the GPU target a 1.5B colocated
sync under 1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import ensure_malloc_env, fmt_bytes, machine_line, peak_extra_bytes, time_ms  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _qwen_15b_config() -> dict:
    import json

    import megarl.models

    path = Path(megarl.models.__file__).parent / "configs" / "qwen2.5-math-1.5b.json"
    return json.loads(path.read_text()) | {"max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                                          "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": 1}


def _tiny_config() -> dict:
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, intermediate_size=96,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                tie_word_embeddings=False, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)


def random_hf_dir(config: dict, dtype, root: Path, tokenizer_dir: Path | None = None) -> Path:
    """An HF directory with a config, a tokenizer and NO weights: transformers initialises them
    randomly on load, so a multi-GB model needs no multi-GB file (the sync overwrites them).
    The tokenizer files come from tokenizer_dir (default: the packaged SmolLM2's)."""
    import json

    from safetensors.torch import save_file

    from megarl.models.packaged import smollm2_hf_dir

    path = root / "model"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config | {"torch_dtype": str(dtype).removeprefix("torch.")}))
    save_file({}, str(path / "model.safetensors"), metadata={"format": "pt"})
    tok = tokenizer_dir or smollm2_hf_dir()  # any tokenizer: the engine needs one, the sync does not use it
    for name in TOKENIZER_FILES:
        if (tok / name).exists():
            shutil.copy(tok / name, path / name)
    return path


def build_trainer(spec, model_dir: Path | None, layout, groups, dtype, device):
    from megarl.models.builder import build_model
    from megarl.models.mappings import iter_safetensors, load_hf_state_into

    chunks = build_model(spec, layout, groups=groups, dtype=dtype)
    if device.type == "cuda":
        chunks = [c.to(device) for c in chunks]
    if model_dir is not None:
        load_hf_state_into(chunks, spec, layout, iter_safetensors(model_dir))
    return chunks


def spec_bytes(spec, dtype) -> int:
    """Bytes of one copy of the model's weights."""
    import torch

    h, f, layers = spec.hidden_size, spec.ffn_hidden_size, spec.num_layers
    per_layer = h * (spec.q_size + 2 * spec.kv_size) + spec.q_size * h + 3 * h * f + 2 * h
    embed = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return (layers * per_layer + embed + h) * torch.empty(0, dtype=dtype).element_size()


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memcpy_fn(chunks, device):
    """(fn, bytes): fn copies every trainer parameter once, each into a warm, reused buffer."""
    import torch

    params = [p.detach() for c in chunks for p in c.parameters()]
    buf = torch.empty(max(p.numel() for p in params), dtype=params[0].dtype, device=device)

    def run():
        for p in params:
            buf[: p.numel()].copy_(p.view(-1))

    run()  # touch the buffer once
    return run, sum(p.numel() * p.element_size() for p in params)


def paired_ms(fn, baseline, device, repeats: int) -> tuple[float, float, float, float]:
    """Median ms of fn, of baseline, median of the per-pair wall-time ratios, and median of the
    per-pair CPU-time ratios (this process, all threads): the two are timed alternately, so load
    from other processes on a shared machine hits both alike. On an oversubscribed CPU the wall
    ratio also counts time the threads waited for a core; the CPU ratio counts the work done
    (plus any spinning of idle pool threads)."""
    import statistics

    times, bases, ratios, cpu_ratios = [], [], [], []
    for _ in range(repeats):
        c0 = time.process_time()
        b = time_ms(baseline, device, warmup=0, repeats=1)
        c1 = time.process_time()
        t = time_ms(fn, device, warmup=0, repeats=1)
        c2 = time.process_time()
        times.append(t)
        bases.append(b)
        ratios.append(t / b)
        cpu_ratios.append((c2 - c1) / max(c1 - c0, 1e-9))
    return statistics.median(times), statistics.median(bases), statistics.median(ratios), statistics.median(cpu_ratios)


def bench_model(name: str, args, device, dtype) -> list[dict]:
    import torch

    from megarl.models.hf_config import arch_spec
    from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_parallel
    from megarl.rollout.bridge import BridgeConfig, WeightBridge
    from megarl.rollout.hf_engine import HFEngine

    layout = ParallelLayout()
    groups = init_parallel(layout, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="megarl-sync-bench-"))
    rows = []
    try:
        t0 = time.perf_counter()
        if name == "smollm2-135m":
            from megarl.models.packaged import smollm2_hf_dir

            engine_dir = trainer_dir = smollm2_hf_dir()
        else:
            config = _qwen_15b_config() if name == "qwen2.5-1.5b-random" else _tiny_config()
            engine_dir, trainer_dir = random_hf_dir(config, dtype, tmp, args.tokenizer_dir), None
        spec = arch_spec(engine_dir)
        need = 2 * spec_bytes(spec, dtype) + (1 << 30)
        if device.type == "cpu" and available_bytes() < need:
            print(f"# {name}: skipped, needs ~{fmt_bytes(need)} of free memory for the trainer and the engine, "
                  f"{fmt_bytes(available_bytes())} available")
            return rows
        chunks = build_trainer(spec, trainer_dir, layout, groups, dtype, device)
        engine = HFEngine(engine_dir, dtype=dtype, device=device)
        print(f"# {name}: trainer + engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
        baseline, nbytes = memcpy_fn(chunks, device)
        sdtype = str(dtype).removeprefix("torch.")

        def measure(label, bridge, target):
            report = bridge.sync(target)  # also the warm-up
            ms, base_ms, ratio, cpu_ratio = paired_ms(lambda: bridge.sync(target), baseline, device, args.repeats)
            peak = peak_extra_bytes(lambda: bridge.sync(target), device)
            rows.append(dict(model=name, case=label, path=report.path, bytes=report.bytes or nbytes,
                             memcpy_ms=base_ms, ms=ms, ratio=ratio, cpu_ratio=cpu_ratio, peak=peak, bucket=bridge.config.bucket_bytes,
                             buckets=report.num_buckets, probe_diff=report.probe_max_abs_diff))
            print(f"#   {label}: {ms:.0f} ms, memcpy {base_ms:.0f} ms, ratio {ratio:.2f}x (CPU time {cpu_ratio:.2f}x), peak extra "
                  f"{fmt_bytes(peak)}", flush=True)

        cfg = dict(bucket_mb=args.bucket_mb, dtype=sdtype, verify_every=0)
        measure("sync (checksums)", WeightBridge(chunks, spec, layout, groups, BridgeConfig(**cfg)), engine)
        measure("sync, no checksum", WeightBridge(chunks, spec, layout, groups, BridgeConfig(**cfg | dict(checksum=False))),
                engine)
        big_on_cpu = name == "qwen2.5-1.5b-random" and device.type == "cpu"
        if not big_on_cpu:  # a probe forward of 1.5B on CPU says nothing about the sync
            probe_atol = 1e-3 if dtype == torch.float32 else 0.1
            measure("sync + probe", WeightBridge(chunks, spec, layout, groups,
                                                 BridgeConfig(**cfg | dict(verify_every=1, probe_atol=probe_atol))),
                    engine)
        if not big_on_cpu:
            from megarl.rollout.megatron_engine import MegatronEngine

            del engine
            copy = build_trainer(spec, None, layout, groups, dtype, device)
            meng = MegatronEngine(copy, spec, layout, groups)
            measure("fast path (MegatronEngine copy)", WeightBridge(chunks, spec, layout, groups, BridgeConfig(**cfg)),
                    meng)
    finally:
        destroy_parallel()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-1.5b-random",
                        help="comma list of smollm2-135m, qwen2.5-1.5b-random, tiny")
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the tiny model only, 1 repeat")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tokenizer-dir", type=Path, default=None,
                        help="tokenizer files for the random models' engine (default: the packaged SmolLM2's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 takes thread wake-ups out of a loaded machine")
    args = parser.parse_args(argv)
    ensure_malloc_env()
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    from megarl.parallel.groups import single_process_world

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    models = ["tiny"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    known = {"smollm2-135m", "qwen2.5-1.5b-random", "tiny"}
    if set(models) - known:
        raise ValueError(f"--models: unknown {sorted(set(models) - known)} (known: {sorted(known)})")
    if args.quick:
        args.repeats = 1
    print(machine_line(device), f"; dtype {dtype}; bucket {args.bucket_mb:g} MiB; torch threads {torch.get_num_threads()}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    rows = []
    with single_process_world():
        for name in models:
            rows += bench_model(name, args, device, dtype)
    print("ratio: median over alternating (memcpy, sync) pairs of sync / memcpy, in wall time and in this "
          "process's CPU time")
    print("| model | case | bytes | memcpy ms | sync ms | ratio | CPU-time ratio | peak extra | bucket | buckets | target |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        target = "<= 3x memcpy" if device.type == "cpu" else ("< 1000 ms" if "1.5b" in r["model"] else "")
        print(f"| {r['model']} | {r['case']} | {fmt_bytes(r['bytes'])} | {r['memcpy_ms']:.0f} | {r['ms']:.0f} | "
              f"{r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x | {fmt_bytes(r['peak'])} | {fmt_bytes(r['bucket'])} | "
              f"{r['buckets']} | {target} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
