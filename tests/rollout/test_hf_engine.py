"""HFEngine on tiny random Llama/Qwen2 models with the real SmolLM2 tokenizer."""

from __future__ import annotations

import shutil

import pytest
import torch

from megarl.models.packaged import smollm2_hf_dir
from megarl.rollout.engine import RolloutEngine, SamplingParams
from megarl.rollout.hf_engine import HFEngine

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_tiny_model(path, arch: str = "llama", seed: int = 0):
    """A 2-layer random model saved as an HF directory with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls_config, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = cls_config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = cls_model(config)
    model.save_pretrained(path)
    source = smollm2_hf_dir()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def engine(llama_dir):
    return HFEngine(llama_dir, max_batch_size=8)


PROMPTS = ["What is 2 + 3?", "Tell me a story about a very long river that", "x"]


def _forward_logprobs(engine: HFEngine, prompt: list[int], completion: list[int], temperature: float = 1.0, top_k: int = 0):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = engine.model(ids).logits[0, len(prompt) - 1 : -1] / temperature
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_greedy_equals_one_at_a_time(tmp_path, arch):
    engine = HFEngine(make_tiny_model(tmp_path, arch), max_batch_size=8)
    assert isinstance(engine, RolloutEngine)
    prompts = [engine.encode(p) for p in PROMPTS]
    sampling = SamplingParams(temperature=0, max_new_tokens=12)
    together = engine.generate(prompts, sampling)
    alone = [engine.generate([p], sampling)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.prompt_index for c in together] == [0, 1, 2]
    twice = engine.generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=12))
    assert [c.prompt_index for c in twice] == [0, 0, 1, 1, 2, 2]
    assert [c.token_ids for c in twice] == [c.token_ids for c in together for _ in range(2)]
    for c, p in zip(together, prompts):
        assert c.finish_reason == "length" and len(c.token_ids) == 12
        # Greedy log-probs are the model's own distribution at each generated position.
        expected = _forward_logprobs(engine, p, c.token_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=1e-4)
        assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_sampling_logprobs_seed_and_order(engine):
    prompts = [engine.encode(p) for p in PROMPTS[:2]]
    sampling = SamplingParams(n=3, temperature=0.7, top_k=20, max_new_tokens=8, seed=123)
    first = engine.generate(prompts, sampling)
    again = engine.generate(prompts, sampling)
    other = engine.generate(prompts, SamplingParams(n=3, temperature=0.7, top_k=20, max_new_tokens=8, seed=124))
    assert [c.prompt_index for c in first] == [0, 0, 0, 1, 1, 1]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    processed = engine.generate(prompts, SamplingParams(n=3, temperature=0.7, top_k=20, max_new_tokens=8, seed=123,
                                                        logprobs_mode="processed"))
    assert [c.token_ids for c in processed] == [c.token_ids for c in first]  # the mode never changes the draws
    for c, d in zip(first, processed):
        # default ("unfiltered"): log softmax(logits / T) over the whole vocabulary
        expected = _forward_logprobs(engine, prompts[c.prompt_index], c.token_ids, temperature=0.7)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=1e-4)
        # "processed": the distribution sampled from (temperature, then the top-k filter)
        expected = _forward_logprobs(engine, prompts[c.prompt_index], c.token_ids, temperature=0.7, top_k=20)
        torch.testing.assert_close(torch.tensor(d.logprobs), expected, atol=1e-4, rtol=1e-4)
    # The global RNG is left alone.
    torch.manual_seed(7)
    a = torch.rand(1)
    torch.manual_seed(7)
    engine.generate(prompts, sampling)
    assert torch.equal(torch.rand(1), a)


def test_stop_strings_and_eos(engine):
    prompt = engine.encode(PROMPTS[1])
    free = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=16))[0]
    text = engine.tokenizer.decode(free.token_ids, skip_special_tokens=False)
    stop = text[6:9]
    assert stop.strip(), text
    stopped = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=16, stop=(stop,)))[0]
    kept = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=16, stop=(stop,),
                                                    include_stop_str_in_output=True))[0]
    assert stopped.finish_reason == kept.finish_reason == "stop"
    assert stopped.extra["stop_reason"] == kept.extra["stop_reason"] == stop
    assert free.token_ids[: len(stopped.token_ids)] == stopped.token_ids == kept.token_ids
    full = engine.tokenizer.decode(stopped.token_ids, skip_special_tokens=True)
    assert stop in full and stop not in engine.tokenizer.decode(stopped.token_ids[:-1], skip_special_tokens=False)
    # the last kept token completes the stop string
    # default (as vLLM): the text ends before the stop string; include_stop_str_in_output: right after it
    assert stopped.text == full[: full.index(stop)]
    assert kept.text == full[: full.index(stop) + len(stop)]
    assert len(stopped.logprobs) == len(stopped.token_ids)
    # EOS: pretend the 4th greedy token is the end-of-sequence token.
    eos = free.token_ids[3]
    saved = engine.eos_token_ids
    try:
        engine.eos_token_ids = (eos,)
        ended = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=16))[0]
    finally:
        engine.eos_token_ids = saved
    first = free.token_ids.index(eos)
    assert ended.token_ids == free.token_ids[: first + 1] and ended.finish_reason == "stop"
    assert ended.extra["stop_reason"] == eos and free.extra["stop_reason"] is None


def test_update_weights(tmp_path, engine, llama_dir):
    other_dir = make_tiny_model(tmp_path / "other", seed=1)
    other = HFEngine(other_dir)
    prompt = [engine.encode(PROMPTS[0])]
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    target = other.generate(prompt, greedy)[0].token_ids
    fresh = HFEngine(llama_dir)
    assert fresh.generate(prompt, greedy)[0].token_ids != target
    state = other.model.state_dict()
    names = sorted(state)
    fresh.update_weights([{n: state[n] for n in names[: len(names) // 2]}, {n: state[n] for n in names[len(names) // 2 :]}])
    assert fresh.generate(prompt, greedy)[0].token_ids == target
    with pytest.raises(ValueError, match="not a weight"):
        fresh.update_weights([{"model.nope.weight": torch.zeros(1)}])
    with pytest.raises(ValueError, match="shape"):
        fresh.update_weights([{"model.norm.weight": torch.zeros(3)}])


def test_sleep_wake_and_errors(engine, tmp_path):
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    engine.wake()
    assert len(engine.generate([[1, 2]], SamplingParams(max_new_tokens=2, temperature=0))[0].token_ids) == 2
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="config.json"):
        HFEngine(tmp_path)
