"""HF <-> megatron mapping functions on hand-checkable tensors (no megatron needed).

The fused layouts are checked against layouts written out by hand, so a wrong but
self-consistent interleaving cannot pass; the 4-rank parity test checks them against megatron.
"""

from __future__ import annotations

import json

import pytest
import torch

from megarl.models.hf_config import ArchSpec
from megarl.models.mappings import (
    LazyTensor,
    global_layer,
    hf_names,
    hf_to_mcore,
    iter_safetensors,
    layer_owner,
    mapping_table,
    mcore_local_shape,
    mcore_names,
    mcore_to_hf,
    normalize_mcore_name,
    to_global_name,
    to_local_name,
)
from megarl.parallel.groups import ParallelLayout


def spec(**kw) -> ArchSpec:
    base = dict(arch="qwen2", hf_architecture="Qwen2ForCausalLM", hidden_size=3, num_layers=4,
                num_attention_heads=4, num_kv_heads=2, head_dim=1, ffn_hidden_size=4, vocab_size=10,
                tie_word_embeddings=False, rope_theta=1e4, rope_scaling=None, norm_eps=1e-6, qkv_bias=True,
                max_position_embeddings=64, make_vocab_size_divisible_by=4)
    base.update(kw)
    return ArchSpec(**base)


def assemble(s: ArchSpec, hf: dict[str, torch.Tensor], mcore_name: str, tp_rank: int, tp_size: int, head="lm"):
    """The local megatron shard built from HF tensors through hf_to_mcore placements."""
    shard = torch.full(mcore_local_shape(s, mcore_name, tp_size, head), float("nan"))
    for name, t in hf.items():
        for pl in hf_to_mcore(s, name, t, tp_rank, tp_size, head):
            if pl.mcore_name != mcore_name:
                continue
            if pl.rows is None:
                shard.copy_(pl.tensor)
            else:
                shard[pl.rows] = pl.tensor
    assert not shard.isnan().any(), f"{mcore_name}: rows left unset"
    return shard


def rows(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1).expand(-1, 3).clone()


def test_qkv_gqa_interleaving_by_hand():
    s = spec()  # 4 q heads, 2 kv groups, head_dim 1: q heads 0,1 use group 0; 2,3 group 1
    hf = {
        "model.layers.0.self_attn.q_proj.weight": rows([10, 11, 12, 13]),
        "model.layers.0.self_attn.k_proj.weight": rows([20, 21]),
        "model.layers.0.self_attn.v_proj.weight": rows([30, 31]),
    }
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    full = assemble(s, hf, name, 0, 1)
    assert full[:, 0].tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    # TP splits by query group: rank r holds group r's q, k, v
    assert assemble(s, hf, name, 0, 2)[:, 0].tolist() == [10, 11, 20, 30]
    assert assemble(s, hf, name, 1, 2)[:, 0].tolist() == [12, 13, 21, 31]
    for tp in (1, 2):
        shards = [assemble(s, hf, name, r, tp) for r in range(tp)]
        back = dict(mcore_to_hf(s, name, shards))
        assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_qkv_bias_and_larger_heads_roundtrip():
    s = spec(hidden_size=8, num_attention_heads=8, num_kv_heads=4, head_dim=3)
    g = torch.Generator().manual_seed(0)
    hf = {f"model.layers.1.self_attn.{p}_proj.bias": torch.randn(n, generator=g)
          for p, n in (("q", 24), ("k", 12), ("v", 12))}
    name = "decoder.layers.1.self_attention.linear_qkv.bias"
    for tp in (1, 2, 4):
        shards = [assemble(s, hf, name, r, tp) for r in range(tp)]
        back = dict(mcore_to_hf(s, name, shards))
        assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_gate_up_fusion_by_hand():
    s = spec()
    hf = {"model.layers.2.mlp.gate_proj.weight": rows([1, 2, 3, 4]), "model.layers.2.mlp.up_proj.weight": rows([5, 6, 7, 8])}
    name = "decoder.layers.2.mlp.linear_fc1.weight"
    assert assemble(s, hf, name, 0, 1)[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert assemble(s, hf, name, 0, 2)[:, 0].tolist() == [1, 2, 5, 6]
    assert assemble(s, hf, name, 1, 2)[:, 0].tolist() == [3, 4, 7, 8]
    back = dict(mcore_to_hf(s, name, [assemble(s, hf, name, r, 2) for r in range(2)]))
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_row_column_replicated():
    s = spec()
    o = torch.arange(12.0).reshape(3, 4)  # [hidden, q_size]
    pl = hf_to_mcore(s, "model.layers.0.self_attn.o_proj.weight", o, 1, 2)
    assert len(pl) == 1 and torch.equal(pl[0].tensor, o[:, 2:])
    norm = torch.tensor([1.0, 2.0, 3.0])
    pl = hf_to_mcore(s, "model.norm.weight", norm, 1, 2)
    assert pl[0].mcore_name == "decoder.final_layernorm.weight" and torch.equal(pl[0].tensor, norm)
    back = mcore_to_hf(s, "decoder.layers.0.self_attention.linear_proj.weight", [o[:, :2], o[:, 2:]])
    assert back[0][0] == "model.layers.0.self_attn.o_proj.weight" and torch.equal(back[0][1], o)


def test_vocab_padding_and_strip():
    s = spec()  # vocab 10, divisible by 4 * tp
    emb = torch.arange(30.0).reshape(10, 3)
    assert mcore_local_shape(s, "embedding.word_embeddings.weight", 2) == (8, 3)  # padded to 16
    r0 = hf_to_mcore(s, "model.embed_tokens.weight", emb, 0, 2)[0].tensor
    r1 = hf_to_mcore(s, "model.embed_tokens.weight", emb, 1, 2)[0].tensor
    assert torch.equal(r0, emb[:8])
    assert torch.equal(r1[:2], emb[8:]) and not r1[2:].any()
    back = mcore_to_hf(s, "embedding.word_embeddings.weight", [r0, r1])
    assert torch.equal(back[0][1], emb)
    r = hf_to_mcore(s, "lm_head.weight", emb, 0, 1)[0]
    assert r.mcore_name == "output_layer.weight" and r.tensor.shape == (12, 3)


def test_tied_embedding_feeds_both_and_exports_once():
    s = spec(tie_word_embeddings=True)
    emb = torch.randn(10, 3)
    names = [p.mcore_name for p in hf_to_mcore(s, "model.embed_tokens.weight", emb, 0, 1)]
    assert names == ["embedding.word_embeddings.weight", "output_layer.weight"]
    assert mcore_to_hf(s, "output_layer.weight", [torch.zeros(12, 3)]) == []
    assert "lm_head.weight" not in hf_names(s)
    with pytest.raises(ValueError, match="unexpected HF tensor 'lm_head.weight'"):
        hf_to_mcore(s, "lm_head.weight", emb, 0, 1)


def test_head_tables():
    s = spec()
    assert [m.hf for m in mapping_table(s, "value")[-2:]] == [("score.weight",), ("score.bias",)]
    orm = {m.mcore: m.hf[0] for m in mapping_table(s, "orm")}
    assert orm["output_layer.hidden.weight"] == "score.0.weight"
    assert orm["output_layer.weight"] == "score.2.weight"
    pl = hf_to_mcore(s, "score.2.weight", torch.randn(2, 3), 1, 2, head="prm")
    assert pl[0].mcore_name == "output_layer.weight" and pl[0].tensor.shape == (2, 3)
    with pytest.raises(ValueError, match="expected \\(1, 3\\)"):
        hf_to_mcore(s, "score.2.weight", torch.randn(2, 3), 0, 1, head="orm")


def test_name_lists_cover_architecture():
    qwen = spec()
    names = hf_names(qwen)
    assert len(names) == 4 * 12 + 3 and len(set(names)) == len(names)
    llama = spec(arch="llama", hf_architecture="LlamaForCausalLM", qkv_bias=False, tie_word_embeddings=True)
    assert len(hf_names(llama)) == 4 * 9 + 2
    assert len(mcore_names(llama)) == 4 * 6 + 3  # the tied output weight is a megatron tensor


def test_errors_name_the_tensor():
    s = spec()
    with pytest.raises(ValueError, match="unexpected HF tensor 'model.layers.0.self_attn.rotary'"):
        hf_to_mcore(s, "model.layers.0.self_attn.rotary", torch.zeros(1), 0, 1)
    with pytest.raises(ValueError, match="'model.norm.weight' has shape \\(4,\\), expected \\(3,\\)"):
        hf_to_mcore(s, "model.norm.weight", torch.zeros(4), 0, 1)
    with pytest.raises(ValueError, match="shard 1 of 2 has shape"):
        mcore_to_hf(s, "decoder.layers.0.mlp.linear_fc2.weight", [torch.zeros(3, 2), torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="no mapping for megatron tensor"):
        mcore_to_hf(s, "decoder.layers.0.mlp.router.weight", [torch.zeros(1)])


def test_transformer_engine_names():
    te = "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert normalize_mcore_name(te) == "decoder.layers.3.input_layernorm.weight"
    out = mcore_to_hf(spec(), "decoder.layers.3.mlp.linear_fc1.layer_norm_weight", [torch.ones(3)])
    assert out[0][0] == "model.layers.3.post_attention_layernorm.weight"


def test_layer_numbering_interleaved():
    s = spec(num_layers=8)
    layout = ParallelLayout(pp=2, vpp=2)
    # chunks in megatron's interleaved order: (pp0,vp0) (pp1,vp0) (pp0,vp1) (pp1,vp1), 2 layers each
    owners = [layer_owner(s, layout, i) for i in range(8)]
    assert owners == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 1, 1)]
    assert [global_layer(s, layout, *o) for o in owners] == list(range(8))
    assert to_local_name(s, layout, "decoder.layers.5.mlp.linear_fc2.weight") == (0, 1, "decoder.layers.1.mlp.linear_fc2.weight")
    assert to_local_name(s, layout, "embedding.word_embeddings.weight") == (None, None, "embedding.word_embeddings.weight")
    assert to_global_name(s, layout, 1, 1, "decoder.layers.0.input_layernorm.weight") == "decoder.layers.6.input_layernorm.weight"
    assert layer_owner(s, ParallelLayout(pp=4), 5) == (2, 0, 1)
    with pytest.raises(ValueError, match="out of range"):
        layer_owner(s, layout, 8)


def test_iter_safetensors_sharded(tmp_path):
    from safetensors.torch import save_file

    a, b = torch.randn(2, 3), torch.randn(4)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    got = {}
    for name, lazy in iter_safetensors(tmp_path):
        assert isinstance(lazy, LazyTensor)
        got[name] = (lazy.shape, lazy.load())
    assert got["a"][0] == (2, 3) and torch.equal(got["a"][1], a) and torch.equal(got["b"][1], b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .safetensors files"):
        list(iter_safetensors(tmp_path / "empty"))
