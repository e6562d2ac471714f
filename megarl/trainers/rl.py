"""The RL training loop (PPO with a critic, GRPO / Dr.GRPO / RLOO / REINFORCE++ on megatron-core).

    for step:
        prompts   <- the next prompts_per_step records (this DP rank's share)
        rollout   <- engine.generate(prompts, n per prompt)          (the actor's own weights)
        rewards   <- weighted sum of reward terms (verifier, format, HAPO)
                     [reward model: ORM shaping of the score, or PRM step rewards per token]
        old/ref   <- log-probs of the rollouts under the actor (and the reference)
        values    <- [PPO] the critic's values of the rollouts
        adv       <- ADVANTAGE_ESTIMATORS[estimator](rollouts, rewards[, values])
        update    <- for epoch, for mini-batch: actor loss over micro-batches, optimizer step
                     [PPO: then the critic's value loss over the same mini-batches]
        (sync)    <- nothing to copy: the in-process engine runs on the trained parameters
        metrics, held-out evaluation, checkpoint

Run it with `megarl train RECIPE.yaml [key=value ...]` (see megarl/commands/train.py): every
process of the SPMD world runs `train(cfg)`.
"""

from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megarl.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs, scores_to_token_rewards
from megarl.algorithms.losses import apply_kl_penalty, compute_actor_loss, count_tokens_and_seqs
from megarl.trainers.config import RLConfig

# Metrics produced on the last pipeline stage by the actor loss; summed over micro-batches and
# DP ranks (each is normalised by global counts), in this fixed order so ranks can all-reduce.
_LOSS_KEYS = ("pg_loss", "clip_frac", "approx_kl", "ratio_mean", "entropy", "kl_loss")
_TOKEN_MEAN_KEYS = ("clip_frac", "approx_kl", "ratio_mean", "entropy")


@dataclass
class RolloutBatch:
    """One step's rollouts on this rank, as padded tensors.

    input_ids [B, S]: prompt + response + padding; targets [B, S]: input_ids shifted left;
    response_mask [B, S]: 1 where targets[b, s] is a response token (so logits at s predict it).
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    response_mask: torch.Tensor
    response_lengths: torch.Tensor  # [B]
    truncated: torch.Tensor  # [B] bool: stopped by max_new_tokens
    prompt_lengths: torch.Tensor | None = None  # [B]: response b starts at input_ids[b, prompt_lengths[b]]


def build_batch(prompt_ids: list[list[int]], completions, pad_id: int, n: int) -> RolloutBatch:
    seqs, starts, lengths, truncated = [], [], [], []
    for i, c in enumerate(completions):
        p = prompt_ids[i // n]
        seqs.append(list(p) + list(c.token_ids))
        starts.append(len(p))
        lengths.append(len(c.token_ids))
        truncated.append(c.finish_reason == "length")
    S = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.float32)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        # logits at position t predict token t+1: response tokens sit at [start, start+len)
        mask[b, starts[b] - 1 : starts[b] - 1 + lengths[b]] = 1.0
    targets = torch.full_like(ids, pad_id)
    targets[:, :-1] = ids[:, 1:]
    return RolloutBatch(ids, targets, mask, torch.tensor(lengths), torch.tensor(truncated), torch.tensor(starts))


def microbatches(batch: RolloutBatch, rows: torch.Tensor, size: int, *, trim_to: int = 0,
                 skip_prompt_logits: bool = False, **per_token: torch.Tensor | None) -> list[dict]:
    """Micro-batch dicts over `rows` of the batch, with extra per-row tensors sliced alongside.

    trim_to > 0 (no pipeline parallelism, where every micro-batch must have one shape): rows are
    grouped by length and each micro-batch is cut to its longest row, rounded up to a multiple
    of trim_to, so padding costs no compute. Sums over micro-batches are unchanged.
    skip_prompt_logits: "logits_from" = the micro-batch's first position whose logits predict
    a response token; the LM head and the log-prob op then skip the positions before it
    (megatron_train.run_microbatches; not under sequence parallelism).
    """
    out = []
    S = batch.input_ids.shape[1]
    pos = torch.arange(S).unsqueeze(0)
    ends = S - batch.response_mask.flip(1).argmax(1)  # [B] input tokens a row needs
    has_response = batch.response_mask.sum(1) > 0
    firsts = torch.where(has_response, batch.response_mask.argmax(1), torch.zeros_like(ends))  # [B]
    if trim_to:
        rows = rows[torch.argsort(ends[rows], stable=True)]
    for i in range(0, len(rows), size):
        r = rows[i : i + size]
        s = S
        if trim_to:
            s = min(S, -(-int(ends[r].max()) // trim_to) * trim_to)
        mb = {
            "rows": r,
            "input_ids": batch.input_ids[r, :s],
            "position_ids": pos[:, :s].expand(len(r), s),
            "targets": batch.targets[r, :s],
            "mask": batch.response_mask[r, :s],
        }
        for k, v in per_token.items():
            if v is not None:
                mb[k] = v[r, :s]
        if skip_prompt_logits and int(firsts[r].min()) > 0:
            mb["logits_from"] = int(firsts[r].min())
        out.append(mb)
    return out


def scatter_rows(outs: list[torch.Tensor], mbs: list[dict], B: int, S: int) -> torch.Tensor:
    """[B, S] from per-micro-batch [b_i, s_i] outputs, put back at their rows (zeros beyond s_i)."""
    full = outs[0].new_zeros((B, S))
    for o, mb in zip(outs, mbs):
        full[mb["rows"], : o.shape[1]] = o
    return full


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def _tokens_logprobs(logits: torch.Tensor, mb: dict, temperature: float, tp_group):
    from megarl.ops import logprob_entropy

    b, s, v = logits.shape
    tp = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    start = mb["targets"].shape[1] - s  # logits from position `start` on (mb["logits_from"])
    targets = mb["targets"][:, start:]
    logp, ent = logprob_entropy(logits.reshape(b * s, v), targets.reshape(-1), temperature, tp)
    logp, ent = logp.view(b, s), ent.view(b, s)
    if start:  # positions before the first response token: never masked in, zeros
        logp, ent = torch.nn.functional.pad(logp, (start, 0)), torch.nn.functional.pad(ent, (start, 0))
    return logp, ent


def forward_logprobs(chunks, mbs: list[dict], temperature: float, groups, shape: tuple[int, int]) -> torch.Tensor | None:
    """[B, S] log-probs of the targets (last pipeline stage; None elsewhere)."""
    from megarl.trainers.megatron_train import run_microbatches

    def loss_fn(mb, logits):
        logp, _ = _tokens_logprobs(logits.float(), mb, temperature, groups.tp_group)
        return logits.new_zeros(()), {"logp": logp.detach()}

    for c in chunks:
        c.eval()
    out = run_microbatches(chunks, mbs, loss_fn, dp=groups.dp, forward_only=True)
    return scatter_rows([o["logp"] for o in out], mbs, *shape) if out else None


def _peak_rss_gb() -> float:
    """Sum over all ranks of each process's peak resident set (VmHWM), in GB."""
    from megarl.procmem import status_bytes

    try:
        peak = status_bytes("VmHWM")
    except (OSError, RuntimeError):  # not Linux
        peak = 0
    t = torch.tensor([peak / 1.024e9], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0])


def minibatch_schedule(B: int, epochs: int, mini_batches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The rows of every optimizer step of one RL step: for each epoch a fresh permutation
    (in order with one mini-batch) split into `mini_batches` parts. Actor and critic share it."""
    per_mini = B // mini_batches
    out = []
    for _epoch in range(epochs):
        perm = torch.randperm(B, generator=generator) if mini_batches > 1 else torch.arange(B)
        out += [perm[m * per_mini : (m + 1) * per_mini] for m in range(mini_batches)]
    return out


def _save_rollouts(path: str, tensors: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)


def _reduce_mean(values: list[float], group) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return (t / dist.get_world_size(group)).tolist()


def train(cfg: RLConfig, overrides_text: str = "") -> dict:
    from transformers import AutoTokenizer

    from megarl.config import dump_config
    from megarl.models.builder import build_model
    from megarl.models.hf_config import arch_spec
    from megarl.models.mappings import iter_safetensors, load_hf_state_into
    from megarl.parallel.groups import ParallelLayout, init_distributed, init_parallel
    from megarl.rollout import SamplingParams
    from megarl.trainers.engines import make_engine, sync_metrics
    from megarl.trainers import checkpoint as ckpt
    from megarl.trainers.data import PromptStream, load_prompt_records, render_prompt, resolve_model_dir
    from megarl.pipelines.one_shot import AccuracyLog
    from megarl.trainers.evaluation import HeldOutEval, default_eval_config
    from megarl.trainers.megatron_train import optimizer_step, run_microbatches, wrap_for_training
    from megarl.trainers.metrics import MetricsLogger
    from megarl.trainers.rewards import RewardComputer
    from megarl.trainers.critic import (CRITIC_LOSS_KEYS, Critic, explained_variance_metrics, global_sum,
                                        value_stats)
    from megarl.trainers.reward_model import RewardModel

    rank, world = init_distributed()
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    layout = ParallelLayout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp)
    groups = init_parallel(layout, seed=cfg.train.seed)
    dp, dp_rank = groups.dp, groups.dp_rank
    if cfg.data.prompts_per_step % dp:
        raise ValueError(f"data.prompts_per_step ({cfg.data.prompts_per_step}) must be divisible by data-parallel size {dp}")
    run_dir = cfg.train.run_dir
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        dump_config(cfg, os.path.join(run_dir, "recipe.resolved.yaml"))
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32

    # --- models -------------------------------------------------------------------------------
    hf_dir = resolve_model_dir(cfg.model.hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    spec = arch_spec(os.path.join(hf_dir, "config.json"))

    def load_model():
        chunks = build_model(spec, layout, dtype=dtype, groups=groups)
        load_hf_state_into(chunks, spec, layout, iter_safetensors(hf_dir))
        return chunks

    o = cfg.optim
    actor = wrap_for_training(load_model(), groups, lr=o.lr, weight_decay=o.weight_decay, beta1=o.beta1,
                              beta2=o.beta2, eps=o.eps, clip_grad=o.clip_grad,
                              use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                              bf16=dtype == torch.bfloat16)
    need_ref = cfg.actor.kl.placement != "none"
    ref_chunks = None
    if need_ref:
        ref_chunks = load_model()
        for c in ref_chunks:
            c.requires_grad_(False)
    critic = (Critic(cfg.critic, hf_dir, layout, groups, dtype=dtype, vocab_size=spec.vocab_size,
                     use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
              if cfg.uses_critic else None)
    reward_model = (RewardModel(cfg.reward.model, layout, groups, dtype=dtype, tokenizer=tokenizer,
                                vocab_size=spec.vocab_size, pad_id=pad_id)
                    if cfg.reward.model is not None else None)
    engine, bridge = make_engine(cfg.rollout, actor.modules, spec, layout, groups, tokenizer, hf_dir, dtype)

    # --- data, rewards, state -----------------------------------------------------------------
    train_records = load_prompt_records(cfg.data.train)
    evaluate = HeldOutEval(default_eval_config(cfg), engine, tokenizer, groups, run_dir, write=rank == 0)
    stream = PromptStream(train_records, seed=cfg.train.seed, shuffle=cfg.data.shuffle,
                          indices=cfg.data.train_indices)
    rewards = RewardComputer(cfg.reward, groups, num_prompts=len(train_records))
    acc_log = AccuracyLog() if cfg.train.acc_log else None
    start_step = 0
    latest = ckpt.latest(run_dir) if cfg.train.resume else None
    if latest is not None:
        state = ckpt.load(latest, actor, groups, critic=critic.model if critic is not None else None)
        stream.load_state_dict(state["data"])
        rewards.load_state_dict(state["rewards"])
        if acc_log is not None and "acc_log" in state:
            acc_log.load_state_dict(state["acc_log"])
        start_step = state["step"]
    logger = MetricsLogger(run_dir, enabled=rank == 0, total_steps=cfg.train.steps, start_step=start_step)
    if latest is not None:
        logger.log_text(f"resumed from {latest} at step {start_step}")
    if bridge is not None:  # a separate engine starts from the (possibly resumed) actor's weights
        report = bridge.sync(engine)
        logger.log_text(f"weights synced to the {cfg.rollout.engine} engine: {report.bytes / 1e6:.1f} MB in "
                        f"{report.seconds:.2f} s, {report.checksums_verified} checksums verified")

    n = cfg.rollout.n
    prompts_per_rank = cfg.data.prompts_per_step // dp

    results: dict = {}
    if start_step == 0 and evaluate.enabled:
        results["accuracy_before"], eval_metrics = evaluate(0)
        logger.scalars(eval_metrics, 0)
        logger.log_text(f"held-out accuracy at step 0: {results['accuracy_before']:.3f}")

    for step in range(start_step, cfg.train.steps):
        timer = Timer()
        # rollout ------------------------------------------------------------------------------
        records = stream.take(cfg.data.prompts_per_step)[dp_rank * prompts_per_rank : (dp_rank + 1) * prompts_per_rank]
        prompt_ids = [render_prompt(tokenizer, r.prompt, cfg.data.prompt_format) for r in records]
        sampling = SamplingParams(n=n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens,
                                  seed=cfg.train.seed * 1_000_003 + step * 1009 + dp_rank)
        for c in actor.modules:
            c.eval()
        with timer("rollout"):
            completions = engine.generate(prompt_ids, sampling)
        batch = build_batch(prompt_ids, completions, pad_id, n)
        B = len(completions)

        # rewards ------------------------------------------------------------------------------
        with timer("reward"):
            answers = [r.answer for r in records for _ in range(n)]
            prompt_index = torch.tensor([r.index for r in records for _ in range(n)])
            scores, correct, reward_metrics = rewards(
                [c.text for c in completions], answers, prompt_index, batch.response_lengths
            )
            verifier_scores, rm_out, token_rewards = scores, None, None
            if reward_model is not None:
                rm_out = reward_model(batch, scores, cfg.train.micro_batch_size)
                reward_metrics.update(rm_out.metrics)
                if rm_out.scores is not None:
                    scores = rm_out.scores  # ORM: the shaped score replaces the sequence score
                token_rewards = rm_out.token_rewards  # PRM: outcome + step rewards per token
        if acc_log is not None:
            acc = torch.tensor(correct, dtype=torch.float).view(-1, n).mean(1)
            acc_log.add([r.index for r in records], acc.tolist(), groups.dp_group)

        # old / reference log-probs --------------------------------------------------------------
        # On-policy (one epoch, one mini-batch) the old policy is the current one: the update's
        # own detached log-probs serve as old_logp (ratio 1, same gradient), unless the KL
        # penalty must enter the rewards before the update.
        rows = torch.arange(B)
        mbs = cfg.train.micro_batch_size
        shape = tuple(batch.input_ids.shape)
        trim = layout.tp if layout.pp == 1 else 0
        skip_prompt = not layout.sequence_parallel  # LM logits only from the first response position
        on_policy = cfg.train.epochs == 1 and cfg.train.mini_batches == 1 and cfg.actor.kl.placement != "reward"
        with timer("logprob"):
            old_logp = None if on_policy else forward_logprobs(
                actor.chunks, microbatches(batch, rows, mbs, trim_to=trim, skip_prompt_logits=skip_prompt),
                cfg.rollout.temperature, groups, shape)
            ref_logp = (forward_logprobs(ref_chunks, microbatches(batch, rows, mbs, trim_to=trim, skip_prompt_logits=skip_prompt),
                                         cfg.rollout.temperature, groups, shape)
                        if need_ref else None)

        # advantages (on every rank: cheap, and identical across a model-parallel group) -------
        # Values exist on the last pipeline stage only, like old_logp: GAE runs there (its
        # whitening all-reduces over the DP group, whose ranks are all last-stage ranks too), and
        # the actor and critic losses, the only users of advantages and returns, run there.
        group_ids = torch.arange(B) // n + dp_rank * prompts_per_rank
        values = returns = None
        if critic is not None:
            with timer("critic"):
                values = critic.values(microbatches(batch, rows, mbs, trim_to=trim), shape)
        if cfg.actor.kl.placement == "reward":
            # only the last stage has log-probs; the penalty lives in the rewards it sees
            dense = token_rewards if token_rewards is not None else scores_to_token_rewards(
                scores.float(), batch.response_mask)
            token_rewards = (apply_kl_penalty(dense, old_logp, ref_logp, cfg.actor.kl.coef, cfg.actor.kl.kind)
                             if old_logp is not None else dense)
        advantages = None
        if critic is None or values is not None:
            adv_inputs = AdvantageInputs(
                response_mask=batch.response_mask,
                scores=None if token_rewards is not None else scores.float(),
                token_rewards=token_rewards,
                values=values,
                group_ids=group_ids,
                process_group=groups.dp_group,
            )
            adv_out = ADVANTAGE_ESTIMATORS[cfg.advantage.estimator](adv_inputs, cfg.advantage)
            advantages, returns = adv_out.advantages, adv_out.returns

        # policy update ------------------------------------------------------------------------
        loss_sums = torch.zeros(len(_LOSS_KEYS), dtype=torch.float64)
        grad_norms = []
        updated_rows = total_rows = 0
        skip_zero = (cfg.train.skip_zero_advantage and cfg.actor.entropy_coef == 0.0
                     and cfg.actor.kl.placement == "none" and not cfg.uses_critic)
        if bridge is not None and cfg.rollout.sleep:
            engine.sleep()
        with timer("update"):
            for c in actor.chunks:
                c.train()
            schedule = minibatch_schedule(B, cfg.train.epochs, cfg.train.mini_batches,
                                          torch.Generator().manual_seed(cfg.train.seed * 7919 + step))
            for mini_rows in schedule:
                # the loss is normalised by the counts of the whole mini-batch ...
                n_tok, n_seq = count_tokens_and_seqs([batch.response_mask[mini_rows]], groups.dp_group)
                if skip_zero:
                    # ... but rows whose advantages are all zero add exactly nothing to the
                    # gradient (no entropy or KL term): leave them out of forward and backward
                    # (every rank keeps one row so the schedule's collectives still meet)
                    live = (advantages[mini_rows] * batch.response_mask[mini_rows]).abs().sum(1) > 0
                    mini_rows = mini_rows[live] if bool(live.any()) else mini_rows[:1]
                mb_list = microbatches(batch, mini_rows, mbs, trim_to=trim, skip_prompt_logits=skip_prompt,
                                       old_logp=old_logp, ref_logp=ref_logp,
                                       adv=advantages)
                kept_tok, kept_seq = count_tokens_and_seqs([mb["mask"] for mb in mb_list], groups.dp_group)
                updated_rows += kept_seq
                total_rows += n_seq
                # token means of the metrics (entropy, clip_frac, ...) over the rows computed
                metric_scale = n_tok / max(kept_tok, 1)

                def loss_fn(mb, logits, n_tok=n_tok, n_seq=n_seq):
                    logp, ent = _tokens_logprobs(logits.float(), mb, cfg.rollout.temperature, groups.tp_group)
                    old = mb["old_logp"] if "old_logp" in mb else logp.detach()
                    out = compute_actor_loss(
                        logp, old, mb["adv"], mb["mask"], cfg.actor,
                        global_num_tokens=max(n_tok, 1), global_num_seqs=max(n_seq, 1),
                        ref_logp_BT=mb.get("ref_logp"), entropy_BT=ent,
                    )
                    return out.loss, {k: out.metrics[k].detach() for k in out.metrics}

                outs = run_microbatches(actor.chunks, mb_list, loss_fn, dp=dp, forward_only=False)
                _, gnorm = optimizer_step(actor)
                grad_norms.append(gnorm)
                for o_ in outs:
                    for j, k in enumerate(_LOSS_KEYS):
                        if k in o_:
                            loss_sums[j] += float(o_[k]) * (metric_scale if k in _TOKEN_MEAN_KEYS else 1.0)
            num_updates = len(schedule)

        # critic update: the same mini-batches, its own optimizer and grad clip -----------------
        critic_sums = torch.zeros(len(CRITIC_LOSS_KEYS), dtype=torch.float64)
        critic_gnorms = []
        if critic is not None:
            with timer("critic"):
                for mini_rows in schedule:
                    mb_list = microbatches(batch, mini_rows, mbs, trim_to=trim, old_values=values, returns=returns)
                    n_tok, n_seq = count_tokens_and_seqs([mb["mask"] for mb in mb_list], groups.dp_group)
                    sums, gnorm = critic.update(mb_list, n_tok, n_seq)
                    critic_sums += sums
                    critic_gnorms.append(gnorm)

        # weight sync: with rollout.engine "megatron" none is needed (the engine generates with
        # actor.modules, the very parameters the optimizer just updated); a separate engine gets
        # the new weights through the bridge, checksummed (and probed) every sync.
        sync_info = {}
        if bridge is not None:
            with timer("sync"):
                if cfg.rollout.sleep:
                    engine.wake()
                sync_info = sync_metrics(bridge.sync(engine))

        # metrics ------------------------------------------------------------------------------
        # loss metrics: only (last stage, tp rank 0) of each DP replica contributes, then SUM
        contributes = groups.is_last_pp_stage and groups.tp_rank == 0
        loss_t = loss_sums / num_updates if contributes else torch.zeros_like(loss_sums)
        dist.all_reduce(loss_t)
        L = batch.response_lengths.float()
        roll = _reduce_mean([
            float(scores.float().mean()), float(scores.float().std()) if B > 1 else 0.0,
            float(torch.tensor(correct, dtype=torch.float).mean()), float(L.mean()), float(L.max()),
            float(batch.truncated.float().mean()),
        ], groups.dp_group)
        critic_metrics = {}
        if critic is not None:
            c_loss = global_sum(critic_sums / num_updates, contributes)
            stats = global_sum(value_stats(values, returns, batch.response_mask) if contributes else torch.zeros(6, dtype=torch.float64),
                               contributes)
            critic_metrics = {
                "critic/value_loss": float(c_loss[0]), "critic/vf_clip_frac": float(c_loss[1]),
                "critic/grad_norm": sum(critic_gnorms) / len(critic_gnorms),
                **{f"critic/{k}": v for k, v in explained_variance_metrics(stats).items()},
            }
        if cfg.train.save_rollouts and contributes:
            _save_rollouts(os.path.join(run_dir, "rollouts", f"step_{step + 1:06d}_dp{dp_rank}.pt"), {
                "input_ids": batch.input_ids, "response_mask": batch.response_mask,
                "prompt_lengths": batch.prompt_lengths, "response_lengths": batch.response_lengths,
                "verifier_scores": verifier_scores, "scores": scores, "token_rewards": token_rewards,
                "correct": torch.tensor(correct), "values": values, "returns": returns, "advantages": advantages,
                **(rm_out.raw if rm_out is not None else {}),
            })
        gen_tokens = torch.tensor([float(L.sum())], dtype=torch.float64)
        dist.all_reduce(gen_tokens, group=groups.dp_group)
        metrics = {
            **sync_info,
            "reward/mean": roll[0], "reward/std": roll[1], "reward/accuracy": roll[2],
            "response/length_mean": roll[3], "response/length_max": roll[4], "response/truncated_frac": roll[5],
            "actor/grad_norm": sum(grad_norms) / len(grad_norms),
            "actor/updated_frac": updated_rows / max(total_rows, 1),
            **{f"actor/{k}": float(v) for k, v in zip(_LOSS_KEYS, loss_t.tolist())
               if k != "kl_loss" or cfg.actor.kl.placement == "loss"},
            **{f"reward/{k}": v for k, v in reward_metrics.items()},
            **critic_metrics,
            **{f"time/{k}": v for k, v in timer.times.items()},
            "time/step": sum(timer.times.values()),
            "perf/rollout_tokens_per_s": float(gen_tokens[0]) / max(timer.times["rollout"], 1e-9),
            "perf/tokens_per_s": float(gen_tokens[0]) / max(sum(timer.times.values()), 1e-9),
            "memory/peak_rss_gb": _peak_rss_gb(),
        }
        last = step + 1 == cfg.train.steps
        if evaluate.enabled and (last or cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0):
            accuracy, eval_metrics = evaluate(step + 1)
            metrics.update(eval_metrics)
            if last:
                results["accuracy_after"] = accuracy
        logger.step(step + 1, metrics)

        # checkpoint ---------------------------------------------------------------------------
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
            extra = {"acc_log": acc_log.state_dict()} if acc_log is not None else {}
            ckpt.save(run_dir, step + 1, actor, groups,
                      {"data": stream.state_dict(), "rewards": rewards.state_dict(), **extra},
                      keep_last=cfg.train.keep_last, critic=critic.model if critic is not None else None)

    if "accuracy_after" not in results:  # resumed at the end: nothing was trained here
        results["accuracy_after"] = evaluate(cfg.train.steps)[0]
    if acc_log is not None and rank == 0:
        acc_log.write(os.path.join(run_dir, "acc_log.json"))
    logger.close()
    rewards.close()
    evaluate.close()
    return results
