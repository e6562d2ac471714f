"""PPO with a critic (estimator gae) and learned reward models (ORM shaping, PRM step rewards) in
`megarl train`, end to end on the demo task (tiny Qwen2, character tokenizer), on gloo ranks.

Three launches:
  * PPO + PRM at PP=2, 4 steps, checkpoint at step 2; then a run resumed from that checkpoint
    must reproduce steps 3-4 (actor, critic, PRM metrics). From the saved rollouts of step 1:
    the critic's values (PP=2) equal the unsharded HF Qwen2ForTokenClassification's; the token
    rewards equal outcome + shape_prm_rewards(PRM step probabilities from an HF reference
    forward) placed by step_rewards_to_token_rewards; the returns equal megarl.ops.gae's.
  * PPO + ORM (loaded from a megarl checkpoint) at TP=2 x DP=2 (4 ranks), 8 steps on one
    prompt: the value loss falls and the explained variance turns positive; the critic's first
    values and the ORM scores equal HF reference forwards, and the sequence scores equal
    qwen_math_shaping(r_m, r_v, alpha).
Config errors for combinations that make no sense are checked in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_models import make_head_model  # noqa: E402

from megarl.config import load_config  # noqa: E402
from megarl.trainers.config import RLConfig  # noqa: E402
from megarl.trainers.reward_model import prm_inputs  # noqa: E402

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_cpu.yaml")
ATOL = 1e-4  # float32, megatron (PP / DP) vs transformers: the same math in another order


def _train(demo, run_dir, *overrides, nproc=2):
    cmd = [sys.executable, "-m", "megarl.cli", "train", RECIPE,
           f"model.hf_dir={demo}/init", f"data.train={demo}/data/train.jsonl", "data.test=null", "data.prompts_per_step=4", "rollout.n=4", "train.micro_batch_size=8",
           "train.mini_batches=2", f"parallel.nproc={nproc}", "train.eval_every=0", "advantage.estimator=gae",
           "train.save_rollouts=true", f"train.run_dir={run_dir}", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _metrics(path):
    return {row["step"]: row for row in map(json.loads, open(path))}


def _rollouts(run_dir, step, dp_rank=0):
    return torch.load(os.path.join(run_dir, "rollouts", f"step_{step:06d}_dp{dp_rank}.pt"), weights_only=False)


def _hf_values(value_dir, ids):
    from transformers import Qwen2ForTokenClassification

    model = Qwen2ForTokenClassification.from_pretrained(value_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits[..., 0]


def _hf_head_outputs(rm_dir, ids):
    """Reference ORM/PRM forward: transformers' Qwen2Model body, then score.2(relu(score.0(h)))."""
    from safetensors.torch import load_file
    from transformers import Qwen2Model

    body = Qwen2Model.from_pretrained(rm_dir, torch_dtype=torch.float32).eval()
    w = load_file(os.path.join(rm_dir, "model.safetensors"))
    with torch.no_grad():
        h = body(input_ids=ids).last_hidden_state
        x = torch.relu(h @ w["score.0.weight"].T + w["score.0.bias"])
        return x @ w["score.2.weight"].T + w["score.2.bias"]


# ---- config ------------------------------------------------------------------------------------


def _cfg(**extra):
    base = {"model": {"hf_dir": "x"}, "data": {"train": "t.jsonl"}}
    for k, v in extra.items():
        base[k] = v
    return load_config(RLConfig, base)


def test_config_accepts_ppo_and_reward_models():
    cfg = _cfg(advantage={"estimator": "gae"}, critic={"hf_dir": "c", "loss": {"value_clip": 0.2}},
               reward={"model": {"kind": "prm", "path": "p", "step_separator": "\n", "step_token": "<extra_0>"}})
    assert cfg.uses_critic and cfg.critic.loss.value_clip == 0.2 and cfg.reward.model.kind == "prm"
    assert _cfg(reward={"model": {"kind": "orm", "path": "p", "alpha": 0.3}}).reward.model.alpha == 0.3


@pytest.mark.parametrize("extra, words", [
    ({"critic": {"hf_dir": "c"}}, ["critic", "'grpo'", "gae"]),
    ({"reward": {"model": {"kind": "prm", "path": "p", "step_separator": "\n"}}}, ["reward.model.kind 'prm'", "gae"]),
    ({"advantage": {"estimator": "gae"}, "reward": {"model": {"kind": "prm", "path": "p"}}},
     ["reward.model.step_separator", "required"]),
    ({"reward": {"model": {"kind": "orm", "path": "p", "step_separator": "\n"}}}, ["reward.model", "for kind 'prm'"]),
    ({"reward": {"model": {"kind": "orm", "path": "p", "alpha": 0}}}, ["reward.model.alpha", "> 0"]),
    ({"reward": {"model": {"kind": "rm", "path": "p"}}}, ["reward.model.kind", "'orm'"]),
    ({"reward": {"model": {"kind": "orm"}}}, ["reward.model.path", "required"]),
    ({"advantage": {"estimator": "gae"}, "critic": {"loss": {"value_clip": -1}}}, ["critic.loss.value_clip"]),
    ({"advantage": {"estimator": "gae"}, "critic": {"optim": {"lrr": 1}}}, ["critic.optim.lrr", "did you mean 'lr'"]),
])
def test_config_errors_name_the_key(extra, words):
    with pytest.raises(ValueError) as err:
        _cfg(**extra)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


# ---- PRM steps ---------------------------------------------------------------------------------


def test_prm_inputs_steps_score_positions_and_step_tokens():
    SEP, TOK, EOS, PAD = 7, 9, 2, 0
    # prompt [5, 6]; responses: "3 7 4 EOS" (2 steps), "3 4 7" (ends on a separator), "EOS" (none)
    ids = torch.tensor([[5, 6, 3, SEP, 4, EOS], [5, 6, 3, 4, SEP, PAD], [5, 6, EOS, PAD, PAD, PAD]])
    plen, rlen = torch.tensor([2, 2, 2]), torch.tensor([4, 3, 1])
    plain = prm_inputs(ids, plen, rlen, SEP, None, (EOS,), PAD)
    assert plain.step_mask.tolist() == [[True, True], [True, False], [False, False]]
    # scores read at the step's last token: the separator, then the last token before EOS
    assert plain.score_pos[0].tolist() == [3, 4] and plain.score_pos[1, 0] == 4
    # rewards land where the logits predict that token (one position to the left)
    assert plain.step_end[0].tolist() == [2, 3] and plain.step_end[1, 0] == 3
    assert plain.input_ids[0].tolist()[:5] == [5, 6, 3, SEP, 4]  # EOS dropped from the PRM input
    tok = prm_inputs(ids, plen, rlen, SEP, TOK, (EOS,), PAD)
    assert tok.input_ids.tolist()[0][:6] == [5, 6, 3, TOK, 4, TOK]  # separator replaced, one appended
    assert tok.input_ids.tolist()[1][:5] == [5, 6, 3, 4, TOK]  # ended on a separator: nothing appended
    assert tok.score_pos[0].tolist() == [3, 5] and tok.score_pos[1, 0] == 4
    assert torch.equal(tok.step_end, plain.step_end) and torch.equal(tok.step_mask, plain.step_mask)
    assert all(tok.input_ids[b, p] == TOK for b in range(3) for p, m in zip(tok.score_pos[b], tok.step_mask[b]) if m)


# ---- end to end --------------------------------------------------------------------------------


def test_ppo_with_prm_at_pp2_matches_references_and_resumes(demo_dir, tmp_path):
    from megarl import ops
    from megarl.algorithms.advantages import scores_to_token_rewards
    from megarl.algorithms.rewards import PrmShapingConfig, shape_prm_rewards, step_rewards_to_token_rewards

    value_dir = make_head_model(demo_dir / "init", tmp_path / "value", "value", seed=1)
    prm_dir = make_head_model(demo_dir / "init", tmp_path / "prm", "prm", seed=2, scale=3.0)
    common = ["parallel.tp=1", "parallel.pp=2", f"critic.hf_dir={value_dir}", "critic.optim.lr=0.001",
              "optim.lr=1e-4", "reward.model.kind=prm", f"reward.model.path={prm_dir}",
              "reward.model.step_separator='1'", "reward.model.step_token='='",
              "reward.model.shaping.refinement=clip_delta", "reward.model.shaping.eta=0.5", "reward.model.weight=0.5"]
    full = tmp_path / "full"
    _train(demo_dir, full, *common, "train.steps=4", "train.save_every=2", "train.keep_last=2")
    split = tmp_path / "split"
    os.makedirs(split / "checkpoints")
    shutil.copytree(full / "checkpoints" / "step_000002", split / "checkpoints" / "step_000002")
    out = _train(demo_dir, split, *common, "train.steps=4", "train.save_every=2", "train.keep_last=2")
    assert "resumed from" in out

    # resume with a critic reproduces the uninterrupted run
    m_full, m_split = _metrics(full / "metrics.jsonl"), _metrics(split / "metrics.jsonl")
    assert sorted(m_split) == [3, 4]
    for step in (3, 4):
        for key in ("reward/mean", "reward/prm_step_mean", "actor/pg_loss", "actor/grad_norm", "critic/value_loss",
                    "critic/grad_norm", "critic/values_mean", "critic/returns_mean"):
            assert m_split[step][key] == pytest.approx(m_full[step][key], rel=1e-5, abs=1e-6), (step, key)
    for step in (1, 2, 3, 4):
        assert {"critic/value_loss", "critic/explained_variance", "critic/grad_norm", "critic/vf_clip_frac",
                "time/critic", "reward/prm_step_mean"} <= set(m_full[step])

    d = _rollouts(full, 1)
    ids, mask = d["input_ids"], d["response_mask"].bool()
    # the critic at PP=2 == the unsharded HF critic (values before any update)
    ref_values = _hf_values(value_dir, ids)
    assert (d["values"][mask] - ref_values[mask]).abs().max() < ATOL
    # PRM token rewards == outcome + weight * shaped step rewards, from an HF reference forward
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "init")
    sep, step_tok = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("=")
    inp = prm_inputs(ids, d["prompt_lengths"], d["response_lengths"], sep, step_tok, (tok.eos_token_id,),
                     tok.pad_token_id)
    assert torch.equal(d["prm_input_ids"], inp.input_ids) and torch.equal(d["prm_step_end"], inp.step_end)
    probs = torch.softmax(_hf_head_outputs(prm_dir, inp.input_ids), -1)[..., 1].gather(1, inp.score_pos)
    step_mask = d["prm_step_mask"]
    assert step_mask.any()
    assert (d["prm_step_probs"][step_mask] - probs[step_mask]).abs().max() < ATOL
    shaped = shape_prm_rewards(probs * step_mask, PrmShapingConfig("clip_delta", 0.5), step_mask) * 0.5
    expected = (scores_to_token_rewards(d["verifier_scores"].float(), d["response_mask"])
                + step_rewards_to_token_rewards(shaped, d["prm_step_end"], ids.shape[1], step_mask))
    assert (expected - d["token_rewards"]).abs().max() < ATOL
    assert shaped.abs().sum() > 0.1  # the PRM did change the rewards
    # rank 0 (first stage) logs what the last stage computed: the PRM output was broadcast
    assert m_full[1]["reward/prm_step_mean"] == pytest.approx(float(probs[step_mask].mean()), abs=ATOL)
    # returns are GAE's (gamma = lam = 1) over those rewards and the critic's values
    _, returns = ops.gae(d["token_rewards"], d["values"], d["response_mask"], 1.0, 1.0)
    assert (returns[mask] - d["returns"][mask]).abs().max() < 1e-5


def test_ppo_with_orm_at_tp2_dp2_learns_values_and_shapes_scores(demo_dir, tmp_path):
    from megarl.algorithms.rewards import qwen_math_shaping

    value_dir = make_head_model(demo_dir / "init", tmp_path / "value", "value", seed=1)
    from megarl.models.convert import hf_to_mcore_dir

    orm_dir = make_head_model(demo_dir / "init", tmp_path / "orm", "orm", seed=3, scale=3.0)
    orm_mcore = tmp_path / "orm_mcore"  # the reward model as a megarl checkpoint at the run's layout
    hf_to_mcore_dir(orm_dir, orm_mcore, tp=2, pp=1, progress=False)
    run = tmp_path / "orm_run"
    _train(demo_dir, run, "parallel.tp=2", "parallel.pp=1", "train.steps=8", "train.epochs=4", "optim.lr=1e-5",
           f"critic.hf_dir={value_dir}", "critic.optim.lr=0.001", "reward.model.kind=orm",
           f"reward.model.path={orm_mcore}", "reward.model.alpha=0.7", "data.train_indices=[0]", nproc=4)
    m = _metrics(run / "metrics.jsonl")
    assert sorted(m) == list(range(1, 9))
    # the critic learns: value loss falls, explained variance goes from negative to positive
    assert m[1]["critic/explained_variance"] < 0
    assert m[7]["critic/explained_variance"] > 0 and m[8]["critic/explained_variance"] > 0
    assert max(m[7]["critic/value_loss"], m[8]["critic/value_loss"]) < m[1]["critic/value_loss"] / 4
    dumps = [_rollouts(run, 1, dp_rank) for dp_rank in (0, 1)]
    assert m[1]["reward/mean"] == pytest.approx(float(torch.cat([d["scores"] for d in dumps]).mean()), abs=1e-5)
    assert m[1]["reward/rm_score_mean"] == pytest.approx(float(torch.cat([d["rm_score"] for d in dumps]).mean()),
                                                         abs=1e-5)
    for d in dumps:
        ids, mask = d["input_ids"], d["response_mask"].bool()
        assert (d["values"][mask] - _hf_values(value_dir, ids)[mask]).abs().max() < ATOL
        last = d["prompt_lengths"] + d["response_lengths"] - 1
        r_m = _hf_head_outputs(orm_dir, ids)[torch.arange(len(ids)), last, 0]
        assert (d["rm_score"] - r_m).abs().max() < ATOL
        assert r_m.std() > 0.01  # the ORM tells responses apart
        expected = qwen_math_shaping(d["rm_score"], d["verifier_scores"].float(), 0.7)
        assert torch.allclose(d["scores"], expected, atol=1e-6)
        assert d["token_rewards"] is None
