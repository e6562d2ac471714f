"""`megarl eval`: run a model on benchmarks and write results.json, results.md, samples.jsonl."""

from __future__ import annotations

import sys

HELP = "evaluate a model on math benchmarks (greedy pass@1, avg@k, pass@k, maj@k) with the training grader"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="a Hugging Face model directory, or a megarl checkpoint directory (converted on the fly)")
    parser.add_argument("--benchmarks", required=True,
                        help="comma-separated names: math500, aime24, aime25, amc23, minerva_math, olympiadbench, "
                             "gsm8k_test, gsm8k_train, dsr_sub, arith_test (alias arith), arith_train")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    parser.add_argument("--n", type=int, default=None, help="samples per problem (default: per benchmark, see docs/evaluation.md)")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: per benchmark)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 3072 (arith: 48)")
    parser.add_argument("--template", default=None,
                        help="qwen25-math-cot (default for math), qwen25-math-tir, one-shot-rlvr, chat (default for arith)")
    parser.add_argument("--out", default=None, help="output directory (default: runs/eval/<model>-<time>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--grader-workers", type=int, default=2)
    parser.add_argument("--grader-timeout", type=float, default=5.0, help="seconds per graded item")
    parser.add_argument("--tir-max-executions", type=int, default=4)
    parser.add_argument("--no-samples", action="store_true", help="do not write samples.jsonl")


def _model_source(path_str: str):
    """("hf", dir) for a Hugging Face model directory, ("mcore", dir) for a megarl checkpoint."""
    import json
    from pathlib import Path

    from megarl.models.checkpoint import MANIFEST, is_mcore_checkpoint

    path = Path(path_str)
    if not path.exists():
        raise ValueError(f"--model {path}: no such directory")
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", path
    if path.is_dir() and is_mcore_checkpoint(path):
        head = json.loads((path / MANIFEST).read_text()).get("head")
        if head != "lm":
            raise ValueError(f"--model {path}: a megarl checkpoint with a {head!r} head; evaluation needs a language model ('lm')")
        return "mcore", path
    raise ValueError(
        f"--model {path}: expected a Hugging Face model directory (config.json, *.safetensors, "
        f"tokenizer files) or a megarl checkpoint directory (with {MANIFEST})"
    )


def main(args) -> int:
    import time
    from pathlib import Path

    from megarl.eval.runner import EvalConfig, run_eval, write_results
    from megarl.rewards.grader import GraderConfig
    from megarl.rewards.tir import TIRConfig

    try:
        kind, model_dir = _model_source(args.model)
        config = EvalConfig(
            benchmarks=tuple(b.strip() for b in args.benchmarks.split(",") if b.strip()),
            limit=args.limit,
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            template=args.template,
            seed=args.seed,
            batch_size=args.batch_size,
            grader=GraderConfig(num_workers=args.grader_workers, timeout_s=args.grader_timeout),
            tir=TIRConfig(max_executions=args.tir_max_executions),
        )
    except ValueError as e:
        print(f"megarl eval: error: {e}", file=sys.stderr)
        return 2

    import tempfile

    import torch

    from megarl.rollout.hf_engine import HFEngine

    out = Path(args.out) if args.out else Path("runs") / "eval" / f"{model_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="megarl-eval-") as scratch:
        hf_dir = model_dir
        if kind == "mcore":
            from megarl.models.convert import mcore_to_hf_dir

            # The engine reads HF layout: convert (any tp/pp) into a throwaway HF directory.
            hf_dir = Path(scratch) / "hf"
            print(f"[eval] converting megarl checkpoint {model_dir} to an HF directory", flush=True)
            mcore_to_hf_dir(model_dir, hf_dir, progress=False)
        engine = HFEngine(hf_dir, dtype=getattr(torch, args.dtype), device=args.device, max_batch_size=args.batch_size)
        results, samples = run_eval(
            engine, engine.tokenizer, config, model=str(model_dir), log=lambda msg: print(msg, flush=True)
        )
    results["model_format"] = "megarl checkpoint (converted to HF)" if kind == "mcore" else "hf"
    results["engine"] = "hf"
    results["device"] = args.device
    results["dtype"] = args.dtype
    paths = write_results(results, None if args.no_samples else samples, out)
    print(Path(paths["markdown"]).read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
