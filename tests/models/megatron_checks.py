"""Single-process megatron-core checks of the builder, heads and loader.

Not collected directly: test_megatron_single_process.py runs this file in a child pytest
process, because init_parallel enables the CPU compatibility layer, which patches torch
process-wide (it would leak into every other test of the session).
"""

from __future__ import annotations

import pytest
import torch

from megarl.models.builder import build_model
from megarl.models.heads import last_token_scores
from megarl.models.hf_config import arch_spec, rope_inv_freq, transformer_config
from megarl.models.mappings import load_hf_state_into
from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_parallel, single_process_world

LAYOUT = ParallelLayout()
TOL = 1e-4


@pytest.fixture(scope="module")
def groups():
    with single_process_world():
        g = init_parallel(LAYOUT, seed=7)
        yield g
        destroy_parallel()


def tiny_qwen2(tied: bool, seed: int = 0, vocab: int = 300):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=vocab, tie_word_embeddings=tied, initializer_range=0.2,
                      max_position_embeddings=64, architectures=["Qwen2ForCausalLM"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def score_tensors(hidden: int, outputs: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"score.0.weight": 0.3 * torch.randn(hidden, hidden, generator=g),
            "score.0.bias": 0.3 * torch.randn(hidden, generator=g),
            "score.2.weight": 0.3 * torch.randn(outputs, hidden, generator=g),
            "score.2.bias": 0.3 * torch.randn(outputs, generator=g)}


def forward(chunks, ids, **kw):
    (m,) = chunks
    m.eval()
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return m(ids, pos, None, **kw)


def ratio(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


IDS = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind, outputs", [("orm", 1), ("prm", 2)])
def test_reward_heads_match_reference(groups, kind, outputs):
    hf = tiny_qwen2(tied=True)
    arch = {"orm": "Qwen2ForRewardModel", "prm": "Qwen2ForProcessRewardModel"}[kind]
    spec = arch_spec(hf.config.to_dict() | {"architectures": [arch], "num_labels": outputs})
    assert spec.hf_head == kind
    score = score_tensors(32, outputs)
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("lm_head")} | score
    chunks = build_model(spec, LAYOUT, head=kind, groups=groups)
    load_hf_state_into(chunks, spec, LAYOUT, state.items())
    out = forward(chunks, IDS)
    assert out.shape == (3, 10, outputs)
    with torch.no_grad():
        h = hf.model(IDS).last_hidden_state
        want = torch.relu(h @ score["score.0.weight"].T + score["score.0.bias"]) @ score["score.2.weight"].T + score["score.2.bias"]
    assert ratio(out, want) <= TOL
    if kind == "orm":
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[0, 7:] = 0
        assert torch.allclose(last_token_scores(out, mask), want[[0, 1, 2], [6, 9, 9], 0], rtol=1e-4, atol=1e-5)


def test_critic_starts_from_actor_checkpoint(groups):
    actor = tiny_qwen2(tied=True, seed=4)
    spec = arch_spec(actor.config.to_dict())
    critic = build_model(spec, LAYOUT, head="value", groups=groups)
    assert not critic[0].share_embeddings_and_output_weights  # its own embedding, loaded from the actor's
    head_init = {k: v.clone() for k, v in critic[0].output_layer.named_parameters()}
    assert head_init["weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="missing HF tensor\\(s\\) score.weight"):
        load_hf_state_into(critic, spec, LAYOUT, actor.state_dict().items())
    load_hf_state_into(critic, spec, LAYOUT, actor.state_dict().items(), head_from_checkpoint=False)
    for k, v in critic[0].output_layer.named_parameters():
        assert torch.equal(v, head_init[k]), f"head {k} must keep its initialisation"
    lm = build_model(spec, LAYOUT, head="lm", groups=groups)
    load_hf_state_into(lm, spec, LAYOUT, actor.state_dict().items())
    body = {k: v for k, v in lm[0].named_parameters() if not k.startswith("output_layer")}
    critic_params = dict(critic[0].named_parameters())
    assert all(torch.equal(critic_params[k], v) for k, v in body.items())
    values = forward(critic, IDS)
    with torch.no_grad():
        h = actor.model(IDS).last_hidden_state
        want = h @ head_init["weight"].T + head_init["bias"]
    assert values.shape == (3, 10, 1) and ratio(values, want) <= TOL


def test_load_errors_are_collected(groups):
    hf = tiny_qwen2(tied=False, seed=5)
    spec = arch_spec(hf.config.to_dict())
    state = dict(hf.state_dict())
    del state["model.norm.weight"]
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(48, 32)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # ignored, as in HF
    state["model.extra.weight"] = torch.zeros(3)
    state["model.layers.0.input_layernorm.weight"] = torch.zeros(33)
    chunks = build_model(spec, LAYOUT, groups=groups)
    with pytest.raises(ValueError) as err:
        load_hf_state_into(chunks, spec, LAYOUT, state.items())
    msg = str(err.value)
    for part in ["layer 9 >= num_hidden_layers 2", "unexpected tensor 'model.extra.weight'",
                 "'model.layers.0.input_layernorm.weight' has shape (33,), expected (32,)",
                 "missing HF tensor(s) model.norm.weight", "missing HF tensor(s) model.layers.0.input_layernorm.weight"]:
        assert part in msg, (part, msg)
    assert "inv_freq" not in msg


def test_load_into_wrapped_chunks(groups):
    """Trainers wrap chunks (megatron DDP, Float16Module: the model is `.module`)."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    hf = tiny_qwen2(tied=True, seed=11)
    spec = arch_spec(hf.config.to_dict())
    chunks = build_model(spec, LAYOUT, groups=groups)
    load_hf_state_into([Wrapper(Wrapper(chunks[0]))], spec, LAYOUT, hf.state_dict().items())
    with torch.no_grad():
        assert ratio(forward(chunks, IDS)[..., :300], hf(IDS).logits) <= TOL


def test_head_tensors_of_another_head_rejected(groups):
    hf = tiny_qwen2(tied=False, seed=6)
    spec = arch_spec(hf.config.to_dict())
    prm_state = {k: v for k, v in hf.state_dict().items() if not k.startswith("lm_head")} | score_tensors(32, 2)
    chunks = build_model(spec, LAYOUT, head="value", groups=groups)
    with pytest.raises(ValueError, match="'score.0.weight' does not belong to a 'value' model"):
        load_hf_state_into(chunks, spec, LAYOUT, prm_state.items())
    load_hf_state_into(chunks, spec, LAYOUT, prm_state.items(), head_from_checkpoint=False)


def test_kv_cache_decoding_matches_full_forward(groups):
    """Prefill + one-token decode steps through megatron's StaticInferenceContext (KV cache:
    SDPAttention sees sq < sk, then no mask) give the full forward's logits."""
    from megatron.core.inference.contexts import StaticInferenceContext

    hf = tiny_qwen2(tied=True, seed=8)
    spec = arch_spec(hf.config.to_dict())
    chunks = build_model(spec, LAYOUT, groups=groups)
    load_hf_state_into(chunks, spec, LAYOUT, hf.state_dict().items())
    full = forward(chunks, IDS)[..., :300]
    ctx = StaticInferenceContext(max_batch_size=3, max_sequence_length=16)
    prompt = 6
    got = [forward(chunks, IDS[:, :prompt], inference_context=ctx, runtime_gather_output=True)[:, -1, :300]]
    ctx.increment_sequence_len_offset(prompt)
    ctx.enable_decode_mode()
    for t in range(prompt, IDS.shape[1]):
        ids = IDS[:, t : t + 1]
        (m,) = chunks
        with torch.no_grad():
            out = m(ids, torch.full_like(ids, t), None, inference_context=ctx, runtime_gather_output=True)
        got.append(out[:, -1, :300])
        ctx.increment_sequence_len_offset(1)
    got = torch.stack(got, dim=1)
    assert ratio(got, full[:, prompt - 1 :]) <= TOL


def test_padding_mask_left_padded_row(groups):
    """A megatron boolean mask (True = masked) hides left padding: the padded row's last-token
    logits equal the unpadded row's (RoPE depends only on relative positions)."""
    hf = tiny_qwen2(tied=False, seed=9)
    spec = arch_spec(hf.config.to_dict())
    chunks = build_model(spec, LAYOUT, groups=groups)
    load_hf_state_into(chunks, spec, LAYOUT, hf.state_dict().items())
    ids = IDS[:1, :7]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    pad = torch.tensor([[True] * 3 + [False] * 7])
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    mask = ~(causal & ~pad[:, None, :])  # [1, 10, 10], True = masked
    mask[:, :3, :3] = ~torch.eye(3, dtype=torch.bool)  # padded queries attend to themselves
    (m,) = chunks
    with torch.no_grad():
        got = m(padded, torch.arange(10).unsqueeze(0), mask.unsqueeze(1))[0, -1, :300]
        want = forward(chunks, ids)[0, -1, :300]
    assert ratio(got, want) <= TOL


def test_bf16_build_runs_close_to_float32(groups):
    hf = tiny_qwen2(tied=True, seed=10)
    spec = arch_spec(hf.config.to_dict())
    chunks = build_model(spec, LAYOUT, groups=groups, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in chunks[0].parameters())
    load_hf_state_into(chunks, spec, LAYOUT, hf.state_dict().items())
    out = forward(chunks, IDS)[..., :300].float()
    with torch.no_grad():
        want = hf(IDS).logits
    assert ratio(out, want) <= 0.05


def test_transformer_config_fields():
    smol = arch_spec({"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
                      "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64,
                      "rms_norm_eps": 1e-05, "vocab_size": 49152, "tie_word_embeddings": True})
    cfg = transformer_config(smol, ParallelLayout(pp=2), torch.float32, variable_seq_lengths=True)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (30, 576, 9, 3)
    assert (cfg.kv_channels, cfg.ffn_hidden_size, cfg.layernorm_epsilon) == (64, 1536, 1e-05)
    assert cfg.gated_linear_unit and cfg.normalization == "RMSNorm" and not cfg.add_qkv_bias
    assert not cfg.add_bias_linear and cfg.hidden_dropout == 0.0 and cfg.variable_seq_lengths
    assert cfg.pipeline_model_parallel_size == 2 and cfg.pipeline_dtype == torch.float32
    # no CUDA here: CPU initialisation, no cuda synchronize in pipeline p2p
    assert cfg.use_cpu_initialization and not cfg.batch_p2p_sync
    bf = transformer_config(arch_spec(tiny_qwen2(tied=True).config.to_dict()), LAYOUT, "bfloat16")
    assert bf.add_qkv_bias and bf.bf16 and bf.params_dtype == torch.bfloat16


def test_megatron_llama3_flag_vs_ours():
    """Why the builder overwrites megatron's inv_freq: megatron's llama3 flag hard-codes
    low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192. That matches
    Llama 3.x's own values, but not a config with others (here original 64)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    def spec_with(orig):
        rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": orig, "rope_theta": 500000.0}
        return arch_spec({"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_attention_heads": 2,
                          "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 10, "rope_parameters": rope})

    mega = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, rotary_base=500000, rope_scaling=True,
                           rope_scaling_factor=32.0, use_cpu_initialization=True).inv_freq
    assert torch.allclose(mega, rope_inv_freq(spec_with(8192)), rtol=1e-6)
    assert not torch.allclose(mega, rope_inv_freq(spec_with(64)), rtol=1e-3)


def test_build_errors(groups):
    hf = tiny_qwen2(tied=False)
    spec = arch_spec(hf.config.to_dict())
    with pytest.raises(ValueError, match="head must be one of"):
        build_model(spec, LAYOUT, head="policy", groups=groups)
    with pytest.raises(ValueError, match="initialised for"):
        build_model(spec, ParallelLayout(pp=2), groups=groups)
    with pytest.raises(ValueError, match="num_hidden_layers=2 is not divisible by pp\\*vpp=4"):
        build_model(spec, ParallelLayout(pp=2, vpp=2), groups=groups)


def test_head_models_have_sharded_state_dict(groups):
    """megatron's checkpointing expects output_layer.weight on the last stage."""
    hf = tiny_qwen2(tied=False)
    spec = arch_spec(hf.config.to_dict())
    for head in ("value", "prm"):
        (m,) = build_model(spec, LAYOUT, head=head, groups=groups)
        sd = m.sharded_state_dict()
        assert "output_layer.weight" in sd and "output_layer.bias" in sd

