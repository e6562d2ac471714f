"""Rollout batches: the response mask must select exactly the logits that predict response tokens."""

import torch

from megarl.rollout import Completion
from megarl.trainers.data import PromptStream, PromptRecord
from megarl.trainers.rl import build_batch, microbatches, scatter_rows


def _c(i, ids, reason="stop"):
    return Completion(prompt_index=i, token_ids=ids, text="", logprobs=None, finish_reason=reason)


def test_build_batch_aligns_targets_and_mask():
    prompts = [[10, 11, 12], [20]]
    comps = [_c(0, [1, 2]), _c(0, [3]), _c(1, [4, 5, 6], "length"), _c(1, [7])]
    b = build_batch(prompts, comps, pad_id=0, n=2)
    assert b.input_ids.tolist() == [[10, 11, 12, 1, 2], [10, 11, 12, 3, 0], [20, 4, 5, 6, 0], [20, 7, 0, 0, 0]]
    # every masked position's target is a response token, in order, and nothing else is masked
    for row, comp in enumerate(comps):
        picked = b.targets[row][b.response_mask[row].bool()].tolist()
        assert picked == comp.token_ids
    assert b.response_lengths.tolist() == [2, 1, 3, 1]
    assert b.truncated.tolist() == [False, False, True, False]


def test_microbatches_slice_rows_consistently():
    prompts = [[1, 2], [3, 4]]
    comps = [_c(0, [5]), _c(0, [6, 7]), _c(1, [8]), _c(1, [9])]
    b = build_batch(prompts, comps, pad_id=0, n=2)
    adv = torch.arange(4.0)[:, None].expand(4, b.input_ids.shape[1])
    mbs = microbatches(b, torch.tensor([3, 1, 0, 2]), 2, adv=adv, old_logp=None)
    assert [mb["adv"][:, 0].tolist() for mb in mbs] == [[3.0, 1.0], [0.0, 2.0]]
    assert "old_logp" not in mbs[0]
    assert all(mb["position_ids"].shape == mb["input_ids"].shape for mb in mbs)


def test_trimmed_microbatches_cover_every_response_token_once():
    prompts = [[1, 2, 3], [4]]
    comps = [_c(0, [5]), _c(0, [6, 7, 8, 9]), _c(1, [10]), _c(1, [11, 12])]
    b = build_batch(prompts, comps, pad_id=0, n=2)
    B, S = b.input_ids.shape
    adv = torch.arange(B, dtype=torch.float)[:, None].expand(B, S)
    mbs = microbatches(b, torch.arange(B), 2, trim_to=2, adv=adv)
    # rows grouped by needed input length (3, 6, 1, 2 tokens), each micro-batch cut to an even length
    assert [mb["rows"].tolist() for mb in mbs] == [[2, 3], [0, 1]]
    assert [mb["input_ids"].shape[1] for mb in mbs] == [2, 6]
    for mb in mbs:
        for j, r in enumerate(mb["rows"].tolist()):
            assert mb["targets"][j][mb["mask"][j].bool()].tolist() == comps[r].token_ids
            assert (mb["adv"][j] == r).all()
    # per-micro-batch outputs scatter back to the rows they came from; masked values intact
    back = scatter_rows([mb["targets"].float() for mb in mbs], mbs, B, S)
    assert torch.equal(back * b.response_mask, b.targets.float() * b.response_mask)


def test_prompt_stream_resumes_exactly():
    recs = [PromptRecord(prompt=str(i), answer=str(i), index=i) for i in range(5)]
    a = PromptStream(recs, seed=3, shuffle=True)
    first = [r.index for r in a.take(7)]
    state = a.state_dict()
    rest = [r.index for r in a.take(6)]
    b = PromptStream(recs, seed=3, shuffle=True)
    b.load_state_dict(state)
    assert [r.index for r in b.take(6)] == rest
    assert sorted(first[:5]) == list(range(5))  # each epoch is a permutation


def test_prompt_stream_indices_select_records():
    recs = [PromptRecord(prompt=str(i), answer=str(i), index=i) for i in range(5)]
    s = PromptStream(recs, seed=0, shuffle=True, indices=(3,))
    assert [r.index for r in s.take(4)] == [3, 3, 3, 3]


class _CharTokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_render_prompt_uses_the_eval_templates():
    import pytest

    from megarl.eval.data import Record
    from megarl.eval.templates import get_template
    from megarl.trainers.data import render_prompt

    tok = _CharTokenizer()
    text = lambda ids: "".join(map(chr, ids))  # noqa: E731
    assert text(render_prompt(tok, "12+3=", "raw")) == "12+3="
    cot = get_template("qwen25-math-cot").render(Record("What is 1+1?", "", "0", "x"))
    assert text(render_prompt(tok, "What is 1+1?", "qwen25-math-cot")) == cot
    with pytest.raises(ValueError, match="chat template"):
        render_prompt(tok, "What is 1+1?", "one-shot-rlvr")
    with pytest.raises(ValueError, match="needs text prompts"):
        render_prompt(tok, [{"role": "user", "content": "hi"}], "qwen25-math-cot")


def test_lm_logits_from_the_first_response_position_give_the_same_update(demo_dir):
    # megatron in a child process (its CPU compatibility layer must not leak into this one)
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "logits_from_script.py")
    out = subprocess.run([sys.executable, script, str(demo_dir / "init")], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0 and "OK logits_from" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
