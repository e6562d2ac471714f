"""Held-out evaluation inside the RL loop, through megarl.eval's harness.

The trainer's engine generates; megarl.eval.runner renders the prompts, grades with the same
grader pool as `megarl eval`, and computes the same metrics (pass@1, avg@k, pass@k, maj@k).
Each data-parallel rank evaluates a slice of the problems and all ranks gather the results.

Which benchmarks: the recipe's `eval` section (an megarl.eval EvalConfig: benchmark names or
JSONL files with their own sampling settings, e.g. the 1-shot RLVR paper's MATH500 greedy and
AIME24 mean-of-8 at temperature 0.6), else `data.test` evaluated greedily with the training
prompt format, `rollout.eval_max_new_tokens` (default: rollout.max_new_tokens) and the training
correctness verifier. The step's accuracy is the macro average of the benchmarks' primary
scores.
"""

from __future__ import annotations

import os
from pathlib import Path

from megarl.eval.runner import EvalConfig, run_eval, write_results
from megarl.rewards.grader import GraderConfig


def default_eval_config(cfg) -> EvalConfig | None:
    """The EvalConfig the trainer uses for an RLConfig (None: no held-out evaluation)."""
    if cfg.eval is not None:
        return cfg.eval
    if not cfg.data.test:
        return None
    verifier = next(t.kind for t in cfg.reward.terms if t.kind in ("math", "last_integer"))
    test = cfg.data.test
    if os.path.isfile(test) and not test.endswith(".jsonl"):
        raise ValueError(f"data.test {test!r}: held-out files must be JSONL (name ending in .jsonl)")
    return EvalConfig(
        benchmarks=(test,),
        limit=cfg.data.test_limit,
        n=1,
        temperature=0.0,
        max_new_tokens=cfg.rollout.eval_max_new_tokens or cfg.rollout.max_new_tokens,
        template=cfg.data.prompt_format,
        verifier=verifier,
        seed=cfg.train.seed,
        batch_size=64,
        grader=GraderConfig(num_workers=cfg.reward.grader_workers, timeout_s=cfg.reward.grader_timeout_s),
    )


def _short(name: str) -> str:
    return Path(name).stem if name.endswith(".jsonl") else name


class HeldOutEval:
    """evaluate(step) -> (accuracy, metrics): runs the harness on every DP rank (all ranks of
    the world must call it: the engine's model-parallel collectives need them), and on the
    first rank writes results.json / results.md / samples.jsonl to run_dir/eval/step_NNNNNN."""

    def __init__(self, config: EvalConfig | None, engine, tokenizer, groups, run_dir: str, *, write: bool) -> None:
        self.config, self.engine, self.tokenizer, self.groups = config, engine, tokenizer, groups
        self.run_dir, self.write = run_dir, write
        self.pools: dict = {}  # grader worker pools, started at the first evaluation, kept until close()

    @property
    def enabled(self) -> bool:
        return self.config is not None

    def __call__(self, step: int) -> tuple[float, dict[str, float]]:
        if self.config is None:
            return float("nan"), {}
        group = self.groups.dp_group if self.groups.dp > 1 else None
        results, samples = run_eval(self.engine, self.tokenizer, self.config, model=f"step {step}", process_group=group,
                                    pools=self.pools)
        if self.write:
            write_results(results, samples, os.path.join(self.run_dir, "eval", f"step_{step:06d}"))
        metrics = {"eval/accuracy": results["average"]["score"]}
        for name, b in results["benchmarks"].items():
            for k, v in b["metrics"].items():
                metrics[f"eval/{_short(name)}/{k}"] = v
        return results["average"]["score"], metrics

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
