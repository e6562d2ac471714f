"""HF config.json -> ArchSpec: supported architectures, both config layouts, clear errors, and
RoPE frequencies equal to transformers' (megatron-free: runs in-process)."""

from __future__ import annotations

import json

import pytest
import torch

from megarl.models.hf_config import RopeScaling, arch_spec, padded_vocab_size, rope_inv_freq, validate_layout
from megarl.parallel.groups import ParallelLayout

# Field values copied from the public config.json files of these models.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
    "vocab_size": 49152, "attention_bias": False, "mlp_bias": False,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
}
QWEN25_MATH_15B = {  # transformers v4 layout: rope_theta at the top level
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
    "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "use_sliding_window": False, "max_window_layers": 21, "tie_word_embeddings": True, "vocab_size": 151936,
    "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643,
}
LLAMA32_1B_V4 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "vocab_size": 128256, "eos_token_id": [128001, 128008, 128009],
}


def test_smollm2():
    s = arch_spec(SMOLLM2_135M)
    assert (s.arch, s.hf_head, s.hidden_size, s.num_layers) == ("llama", "lm", 576, 30)
    assert (s.num_attention_heads, s.num_kv_heads, s.head_dim, s.ffn_hidden_size) == (9, 3, 64, 1536)
    assert s.tie_word_embeddings and not s.qkv_bias
    assert s.rope_theta == 100000.0 and s.rope_scaling is None and s.norm_eps == 1e-05


def test_qwen25_math_v4_layout():
    s = arch_spec(QWEN25_MATH_15B)
    assert s.arch == "qwen2" and s.qkv_bias and s.tie_word_embeddings
    assert s.head_dim == 128 and s.num_kv_heads == 2 and s.rope_theta == 10000.0
    assert s.torch_dtype == "bfloat16"
    # megatron-LM's padding rule: multiple of 128 * tp
    assert padded_vocab_size(s, 1) == 151936
    assert padded_vocab_size(s, 2) == 152064
    assert padded_vocab_size(arch_spec(QWEN25_MATH_15B, make_vocab_size_divisible_by=1), 2) == 151936


def test_llama32_v4_and_v5_layouts_agree():
    v4 = arch_spec(LLAMA32_1B_V4)
    assert v4.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert v4.eos_token_id == (128001, 128008, 128009)
    v5 = dict(LLAMA32_1B_V4)
    scaling = v5.pop("rope_scaling")
    v5["rope_parameters"] = dict(scaling, rope_theta=v5.pop("rope_theta"))
    assert arch_spec(v5) == v4


def test_reward_and_value_classes():
    rm = arch_spec(dict(QWEN25_MATH_15B, architectures=["Qwen2ForRewardModel"]))
    assert (rm.hf_head, rm.num_labels) == ("orm", 1)
    prm = arch_spec(dict(QWEN25_MATH_15B, architectures=["Qwen2ForProcessRewardModel"], num_labels=2))
    assert (prm.hf_head, prm.num_labels) == ("prm", 2)
    critic = arch_spec(dict(SMOLLM2_135M, architectures=["LlamaForTokenClassification"], id2label={"0": "LABEL_0"}))
    assert (critic.hf_head, critic.num_labels) == ("value", 1)
    with pytest.raises(ValueError, match="num_labels=2"):
        arch_spec(dict(QWEN25_MATH_15B, architectures=["Qwen2ForProcessRewardModel"], num_labels=3))


def test_paths_and_pretrained_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    assert arch_spec(tmp_path) == arch_spec(tmp_path / "config.json") == arch_spec(SMOLLM2_135M)
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in SMOLLM2_135M.items() if k != "model_type"})
    assert arch_spec(cfg).num_kv_heads == 3
    with pytest.raises(ValueError, match="does not exist"):
        arch_spec(tmp_path / "nope")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        arch_spec(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["MistralForCausalLM"]}, "architecture 'MistralForCausalLM' is not supported"),
        ({"architectures": None, "model_type": "gemma"}, "model_type 'gemma' is not supported"),
        ({"model_type": "qwen2"}, "does not match"),
        ({"hidden_size": None}, "missing required field 'hidden_size'"),
        ({"num_hidden_layers": "30"}, "'num_hidden_layers' must be an int"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn'"),
        ({"num_key_value_heads": 4}, "not a multiple of"),
        ({"layer_types": ["sliding_attention"] * 30}, "layer_types"),
    ],
)
def test_errors_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        arch_spec(dict(SMOLLM2_135M, **change))


def test_sliding_window_layers_rejected():
    with pytest.raises(ValueError, match="sliding"):
        arch_spec(dict(QWEN25_MATH_15B, use_sliding_window=True))
    # all layers below max_window_layers: full attention everywhere, accepted
    assert arch_spec(dict(QWEN25_MATH_15B, use_sliding_window=True, max_window_layers=28)).num_layers == 28


def test_unknown_override_rejected():
    with pytest.raises(ValueError, match="unknown ArchSpec fields"):
        arch_spec(SMOLLM2_135M, vocab=3)


def test_layout_must_divide_shapes():
    s = arch_spec(SMOLLM2_135M)
    validate_layout(s, ParallelLayout(tp=1, pp=2))
    validate_layout(s, ParallelLayout(tp=3, pp=5))
    with pytest.raises(ValueError, match="num_attention_heads=9 is not divisible by tp=2"):
        validate_layout(s, ParallelLayout(tp=2))
    with pytest.raises(ValueError, match="num_hidden_layers=30 is not divisible by pp\\*vpp=8"):
        validate_layout(s, ParallelLayout(pp=4, vpp=2))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
         "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    ],
)
def test_rope_inv_freq_equals_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, num_hidden_layers=1, head_dim=128, rope_parameters=dict(rope))
    if rope["rope_type"] == "default":
        dim = 128
        want = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    else:
        want, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
    got = rope_inv_freq(arch_spec(cfg))
    assert got.dtype == torch.float32 and got.shape == (64,)
    assert torch.equal(got, want)
