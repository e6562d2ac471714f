"""The CPU demo: a tiny model learns 2-digit addition, first by a short SFT warm-up, then by GRPO.

    prepare(run_dir)   character tokenizer + tiny random Qwen2 model (an ordinary HF directory),
                       train/test JSONL ("37+45=" -> "82"), SFT warm-up (single process,
                       transformers) so the starting accuracy is above zero
    then `megarl train` runs GRPO on that model with the recipe examples/demo_cpu.yaml
    (2 CPU ranks, tensor parallel 2: the same megatron-core code path as on GPUs).

Everything is generated here from a seed: no download, no hub.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

CHARS = list("0123456789+=")
SPECIAL = ["<pad>", "<eos>"]


def make_tokenizer(out_dir: str | os.PathLike):
    """A character-level HF tokenizer (one token per character), saved into out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(str(out_dir))
    return fast


def make_data(out_dir: str | os.PathLike, *, num_train: int = 610, num_test: int = 200, seed: int = 0) -> tuple[str, str]:
    """Disjoint train/test sets of "a+b=" problems, a two-digit, b one-digit (810 in all)."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(1, 10)]
    rng.shuffle(pairs)
    if num_train + num_test > len(pairs):
        raise ValueError(f"at most {len(pairs)} distinct problems, asked for {num_train + num_test}")
    paths = []
    for name, chunk in (("train", pairs[:num_train]), ("test", pairs[num_train : num_train + num_test])):
        path = Path(out_dir) / f"{name}.jsonl"
        with open(path, "w") as f:
            for a, b in chunk:
                f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
        paths.append(str(path))
    return paths[0], paths[1]


def make_model(out_dir: str | os.PathLike, tokenizer, *, seed: int = 0, hidden: int = 128, layers: int = 2):
    """A tiny random Qwen2 (GQA 4 heads / 2 KV heads, so tensor parallel 2 divides it)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-6,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2ForCausalLM(config)


def sft(model, tokenizer, train_path: str, *, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
        teacher_error: float = 0.0):
    """Teacher-forced cross-entropy on the answer tokens (prompt tokens masked out).

    teacher_error: the fraction of demonstrations whose answer is off by one (a + b + 1), an
    imperfect teacher; the verifier reward of the RL phase is what corrects it.
    """
    import torch

    rows = [json.loads(line) for line in open(train_path)]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    model.train()
    for _ in range(steps):
        batch = rng.sample(rows, batch_size)
        seqs, masks = [], []
        for r in batch:
            p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            answer = int(r["answer"]) + (1 if rng.random() < teacher_error else 0)
            a = tokenizer(str(answer), add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(p + a)
            masks.append([0] * len(p) + [1] * len(a))
        S = max(map(len, seqs))
        ids = torch.full((batch_size, S), tokenizer.pad_token_id)
        mask = torch.zeros(batch_size, S)
        for i, (s, m) in enumerate(zip(seqs, masks)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
        logits = model(ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll * mask[:, 1:].reshape(-1)).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def greedy_accuracy(model, tokenizer, test_path: str, max_new_tokens: int = 4) -> float:
    """Greedy exact-answer accuracy (the last integer of the completion), plain full recompute."""
    import torch

    from megarl.rewards.last_integer import last_integer_correct

    rows = [json.loads(line) for line in open(test_path)]
    ids = torch.tensor([tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows])
    out = ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(out).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    texts = []
    for row in out[:, ids.shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row))
    return sum(last_integer_correct(t, r["answer"]) for t, r in zip(texts, rows)) / len(rows)


def prepare(run_dir: str | os.PathLike, *, sft_steps: int, seed: int = 0, teacher_error: float = 0.0) -> dict:
    """Writes run_dir/data/{train,test}.jsonl and run_dir/init (the warmed-up HF model).

    The model directory is written to a temporary sibling and renamed.
    """
    import torch

    run_dir = Path(run_dir)
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    train_path, test_path = make_data(run_dir / "data", seed=seed)
    from megarl.models.checkpoint import atomic_output_dir

    with atomic_output_dir(run_dir / "init", True) as tmp:
        tokenizer = make_tokenizer(tmp)
        model = make_model(tmp, tokenizer, seed=seed)
        torch.manual_seed(seed)
        loss = sft(model, tokenizer, train_path, steps=sft_steps, seed=seed, teacher_error=teacher_error)
        acc = greedy_accuracy(model, tokenizer, test_path)
        model.save_pretrained(tmp)
    return {"model": str(run_dir / "init"), "train": train_path, "test": test_path,
            "sft_loss": loss, "sft_accuracy": acc}
