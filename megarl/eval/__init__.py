"""Evaluation: benchmark loaders, prompt templates, metrics and the runner behind `megarl eval`.

    megarl.eval.data        Record, load_benchmark, BENCHMARKS
    megarl.eval.templates   qwen25-math-cot, qwen25-math-tir, one-shot-rlvr, chat
    megarl.eval.metrics     accuracy, avg_at_k, pass_at_k, maj_at_k, rm_at_k, macro_average
    megarl.eval.runner      EvalConfig, run_eval, write_results

Importing this package loads nothing heavy; docs/evaluation.md has the conventions.
"""
