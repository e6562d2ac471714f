"""In-process rollout engine (MegatronEngine) vs transformers' generate, same batch, same run.

    python benchmarks/rollout.py                 # 32 prompts x 128 new tokens, SmolLM2-135M fp32
    python benchmarks/rollout.py --quick         # 4 prompts x 8 tokens (smoke run)
    python benchmarks/rollout.py --megatron-static   # also megatron-core's StaticInferenceEngine
    python benchmarks/rollout.py --tp-sampling   # only: TP=2 next-token sampling, gather vs gather-free

The prompts are the first MATH500 problems in SmolLM2's chat template (lengths vary, so both
engines left-pad). Both engines decode greedily with EOS ignored, so each produces exactly
batch x new_tokens tokens and their outputs can be compared token by token. Runs alternate
(transformers, megarl, transformers, megarl, ...) so a change of machine load hits both; the
reported time per engine is the median of its runs and the target is megarl / transformers
tokens/s >= 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_prompts(tokenizer, num: int) -> list[list[int]]:
    rows = [json.loads(line) for line in (ROOT / "data" / "math500.jsonl").read_text().splitlines()[:num]]
    out = []
    suffix = "\nPlease reason step by step, and put your final answer within \\boxed{}."
    for r in rows:
        msgs = [{"role": "user", "content": r["problem"] + suffix}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def run_hf(model, tokenizer, prompts, new_tokens: int):
    import torch
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, eos_token_id=None,
                           pad_token_id=pad, num_beams=1)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    return [row[width:].tolist() for row in out]


def run_megarl(engine, prompts, new_tokens: int):
    from megarl.rollout.engine import SamplingParams

    done = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=new_tokens, logprobs=True))
    return [c.token_ids for c in done]


class _MegatronTokenizer:
    """The tokenizer interface megatron's TextGenerationController uses."""

    def __init__(self, tok, eod: int):
        self.tok, self.eod, self.bos = tok, eod, None

    def tokenize(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids, skip_special_tokens: bool = True):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def offsets(self, ids, text):
        return [0] * len(ids)


def megatron_static_runner(chunks, spec, tokenizer, prompts, new_tokens: int):
    """megatron-core's legacy StaticInferenceEngine on the same model and prompts (greedy,
    early termination off so it also makes batch x new_tokens tokens)."""
    import torch
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.engines import StaticInferenceEngine
    from megatron.core.inference.inference_request import InferenceRequest, Status
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from megatron.core.inference.sampling_params import SamplingParams as MSampling
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    from megarl.models.hf_config import padded_vocab_size

    model = chunks[0]
    max_seq = max(len(p) for p in prompts) + new_tokens
    cfg = InferenceWrapperConfig(hidden_size=spec.hidden_size, params_dtype=torch.float32,
                                 inference_batch_times_seqlen_threshold=10**9,
                                 padded_vocab_size=padded_vocab_size(spec, 1),
                                 inference_max_requests=len(prompts), inference_max_seq_length=max_seq)
    ctx = StaticInferenceContext(len(prompts), max_seq)
    wrapped = GPTInferenceWrapper(model, cfg, ctx)
    controller = TextGenerationController(wrapped, _MegatronTokenizer(tokenizer, eod=-1))
    engine = StaticInferenceEngine(controller, max_batch_size=len(prompts), legacy=True)
    params = MSampling(temperature=1.0, top_k=1, num_tokens_to_generate=new_tokens, return_log_probs=True)
    params.no_early_termination = True

    def run():
        reqs = [InferenceRequest(request_id=str(i), prompt="", prompt_tokens=list(p), sampling_params=params,
                                 status=Status.ACTIVE_BUT_NOT_GENERATING_TOKENS) for i, p in enumerate(prompts)]
        ctx.reset()
        out = engine.generate(inference_requests=reqs)
        return [list(r.generated_tokens.tolist() if hasattr(r.generated_tokens, "tolist") else r.generated_tokens)
                for r in out]

    return run


def _tp_sampling_worker(rank: int, world: int, port: int, batch: int, vocab: int, threads: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from megarl.rollout.sampling import sample_vocab_parallel

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    local = vocab // world
    logits = 4 * torch.randn(batch, local, generator=g)
    u = torch.rand(batch, generator=torch.Generator().manual_seed(0))
    rows = []
    for label, t, k, p in (("greedy", 0.0, 0, 1.0), ("T=1", 1.0, 0, 1.0), ("T=0.6, top-k 50", 0.6, 50, 1.0),
                           ("T=0.6, top-p 0.95", 0.6, 0, 0.95)):
        times = {}
        for method in ("gather", "gather_free", "gather", "gather_free"):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(20):
                sample_vocab_parallel(logits, u, t, k, p, dist.group.WORLD, method)
            times.setdefault(method, []).append((time.perf_counter() - t0) / 20 * 1e3)
        rows.append((label, min(times["gather"]), min(times["gather_free"])))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def tp_sampling_bench(batch: int, vocab: int, threads: int) -> None:
    """ms per next-token draw at TP=2 (two gloo processes on this machine) for both methods."""
    import torch.multiprocessing as mp

    from megarl.parallel.groups import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_tp_sampling_worker, args=(r, 2, port, batch, vocab, threads, queue)) for r in range(2)]
    for pr in procs:
        pr.start()
    rows = queue.get(timeout=600)
    for pr in procs:
        pr.join()
    print(f"TP=2 next-token sampling, {batch} rows x {vocab} vocab (float32, gloo, {threads} thread(s) per rank)")
    print("| sampling | gather ms | gather-free ms | gather / gather-free |")
    print("|---|---:|---:|---:|")
    for label, a, b in rows:
        print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per engine (alternating)")
    parser.add_argument("--quick", action="store_true", help="4 prompts x 8 tokens, one run each")
    parser.add_argument("--megatron-static", action="store_true",
                        help="also time megatron-core's StaticInferenceEngine (legacy) on the same batch")
    parser.add_argument("--tp-sampling", action="store_true",
                        help="only measure TP=2 vocab-parallel sampling (gather vs gather-free) and exit")
    args = parser.parse_args(argv)
    if args.tp_sampling:
        tp_sampling_bench(args.batch, 49152, 1)
        return 0
    if args.quick:
        args.batch, args.new_tokens, args.repeats = 4, 8, 1

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megarl.models.builder import build_model
    from megarl.models.hf_config import arch_spec
    from megarl.models.mappings import iter_safetensors, load_hf_state_into
    from megarl.models.packaged import smollm2_hf_dir
    from megarl.parallel.groups import ParallelLayout, init_parallel, single_process_world
    from megarl.rollout.engine import SamplingParams
    from megarl.rollout.megatron_engine import MegatronEngine

    path = smollm2_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = load_prompts(tokenizer, args.batch)
    lens = [len(p) for p in prompts]
    print(machine_line(torch.device("cpu")))
    print(f"SmolLM2-135M-Instruct fp32; {args.batch} prompts (MATH500, {min(lens)}-{max(lens)} tokens) x "
          f"{args.new_tokens} new tokens, greedy, EOS ignored")

    with single_process_world():
        layout = ParallelLayout()
        groups = init_parallel(layout, seed=0)
        spec = arch_spec(path)
        chunks = build_model(spec, layout, groups=groups)
        load_hf_state_into(chunks, spec, layout, iter_safetensors(path))
        engine = MegatronEngine(chunks, spec, layout, groups, tokenizer, eos_token_ids=(),
                                max_batch=args.batch, max_seq_len=max(lens) + args.new_tokens)
        hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        runners = {"transformers": lambda: run_hf(hf, tokenizer, prompts, args.new_tokens),
                   "megarl": lambda: run_megarl(engine, prompts, args.new_tokens)}
        if args.megatron_static:
            runners["megatron-static"] = megatron_static_runner(chunks, spec, tokenizer, prompts, args.new_tokens)
        # warm-up (allocations, lazy init) on a small slice
        run_hf(hf, tokenizer, prompts[:2], 2)
        engine.generate(prompts[:2], SamplingParams(temperature=0.0, max_new_tokens=2))
        times: dict[str, list[float]] = {k: [] for k in runners}
        outputs = {}
        for _ in range(args.repeats):
            for name, fn in runners.items():
                t0 = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - t0)
                print(f"  {name}: {times[name][-1]:.2f} s", flush=True)

    total = args.batch * args.new_tokens
    for name, outs in outputs.items():
        made = sum(len(o) for o in outs)
        if made != total:
            print(f"WARNING: {name} made {made} tokens, expected {total}")
    base = statistics.median(times["transformers"])
    print("| engine | median s | tokens/s | vs transformers | greedy tokens equal to transformers |")
    print("|---|---:|---:|---:|---:|")
    ref = outputs["transformers"]
    for name in runners:
        t = statistics.median(times[name])
        same = sum(a == b for o, r in zip(outputs[name], ref) for a, b in zip(o, r)) / total
        print(f"| {name} | {t:.2f} | {total / t:.1f} | {base / t:.2f}x | {same:.3f} |")
    stats = engine.last_stats
    if stats:
        print(f"megarl last run: prefill {stats['prefill_s']:.2f} s, decode {stats['decode_s']:.2f} s "
              f"({stats['decode_steps']} steps, {stats['waves']} wave(s))")
    ratio = base / statistics.median(times["megarl"])
    print(f"megarl / transformers tokens/s: {ratio:.2f}x (target >= 1x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
