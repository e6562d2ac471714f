"""Tiny HF critic / reward-model directories built from a demo model's weights (test helper)."""

from __future__ import annotations

import json
import os
import shutil


def make_head_model(init_dir, out_dir, kind: str, seed: int = 0, scale: float = 1.0) -> str:
    """An HF directory holding init_dir's transformer body with a random head of `kind`:
    "value" (Qwen2ForTokenClassification, score.weight/bias, one label), "orm"
    (Qwen2ForRewardModel, score.0 / score.2) or "prm" (Qwen2ForProcessRewardModel, 2 labels).
    Head weights are N(0, scale^2 / h), biases N(0, 0.1^2), so scores vary by O(scale)."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.load(open(os.path.join(init_dir, "config.json")))
    body = {k: v for k, v in load_file(os.path.join(init_dir, "model.safetensors")).items() if k != "lm_head.weight"}
    h = cfg["hidden_size"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    if kind == "value":
        arch, labels = "Qwen2ForTokenClassification", 1
        head = {"score.weight": rnd(1, h, std=scale / h ** 0.5), "score.bias": rnd(1, std=0.1)}
    else:
        arch, labels = {"orm": ("Qwen2ForRewardModel", 1), "prm": ("Qwen2ForProcessRewardModel", 2)}[kind]
        head = {"score.0.weight": rnd(h, h, std=1.0 / h ** 0.5), "score.0.bias": rnd(h, std=0.1),
                "score.2.weight": rnd(labels, h, std=scale / h ** 0.5), "score.2.bias": rnd(labels, std=0.1)}
    os.makedirs(out_dir, exist_ok=True)
    save_file({**body, **head}, os.path.join(out_dir, "model.safetensors"))
    cfg.update(architectures=[arch], num_labels=labels)
    cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
    cfg["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(init_dir, name), out_dir)
    return str(out_dir)
