"""1-shot RLVR data selection: rank a training pool by the historical variance score.

The score of example i is the standard deviation of its per-epoch training accuracy recorded
during a full-pool RLVR run (Wang et al. 2025, "Reinforcement Learning for Reasoning in Large
Language Models with One Training Example"). It is the POPULATION standard deviation
(numpy.std, ddof=0), as in the paper's data_selection.py: on dsr_sub_acc_step_500.json it gives
index 124 -> 0.4068 and 267 -> 0.3961 (the sample std, ddof=1, would give 0.4106 and 0.4000).
Histories may have different lengths (examples seen in different numbers of epochs); each std
uses its own history. Ties are broken by the smaller index, so the order never depends on the
order of the keys in the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def load_acc_log(path: str | os.PathLike) -> dict[int, list[float]]:
    """Reads a JSON object {example index: [accuracy per epoch, ...]} and validates it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"accuracy log {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"accuracy log {path} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"accuracy log {path} is not valid JSON: {exc}") from None
    try:
        return _validate(data)
    except ValueError as exc:
        raise ValueError(f"accuracy log {path}: {exc}") from None


def _validate(data: object) -> dict[int, list[float]]:
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object mapping example index to a list of accuracies, got {type(data).__name__}")
    if not data:
        raise ValueError("no examples in the accuracy log")
    out: dict[int, list[float]] = {}
    for key, history in data.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"example key {key!r} is not an integer index") from None
        if index in out:
            raise ValueError(f"example index {index} appears twice")
        if not isinstance(history, Sequence) or isinstance(history, str) or not history:
            raise ValueError(f"example {key!r}: expected a non-empty list of accuracies, got {history!r:.60}")
        values = []
        for x in history:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ValueError(f"example {key!r}: accuracy {x!r} is not a finite number")
            values.append(float(x))
        out[index] = values
    return out


def population_std(values: Sequence[float]) -> float:
    """sqrt(mean((x - mean(x))^2)), numpy.std's default (ddof=0)."""
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((x - mean) ** 2 for x in values) / len(values))


def variance_scores(acc_log: Mapping[object, Sequence[float]] | str | os.PathLike) -> list[tuple[int, float]]:
    """[(index, std), ...] sorted by std, highest first (ties: smaller index first).

    acc_log: the mapping {index: accuracy history}, or the path of its JSON file.
    """
    data = load_acc_log(acc_log) if isinstance(acc_log, (str, os.PathLike)) else _validate(acc_log)
    scores = [(index, population_std(history)) for index, history in data.items()]
    scores.sort(key=lambda item: (-item[1], item[0]))
    return scores


def select_top(acc_log: Mapping[object, Sequence[float]] | str | os.PathLike, top: int) -> list[int]:
    """The indices of the ``top`` highest-variance examples."""
    scores = variance_scores(acc_log)
    if not 1 <= top <= len(scores):
        raise ValueError(f"top must be in [1, {len(scores)}] (the pool size), got {top}")
    return [index for index, _ in scores[:top]]


class AccuracyLog:
    """Per-example training accuracy history, written in the format `load_acc_log` reads.

    Each time an example is trained on, its accuracy over the n rollouts of that occurrence is
    appended to its history; a full-pool run with this log feeds `megarl select-examples`
    (the historical variance score of 1-shot RLVR). Data-parallel ranks each see their own
    prompts: `add` all-gathers them, so every rank holds the same log.
    """

    def __init__(self) -> None:
        self.history: dict[int, list[float]] = {}

    def add(self, indices: Sequence[int], accuracies: Sequence[float], process_group=None) -> None:
        if len(indices) != len(accuracies):
            raise ValueError(f"{len(indices)} indices but {len(accuracies)} accuracies")
        items = [(int(i), float(a)) for i, a in zip(indices, accuracies)]
        import torch.distributed as dist

        if process_group is not None and dist.get_world_size(process_group) > 1:
            parts: list = [None] * dist.get_world_size(process_group)
            dist.all_gather_object(parts, items, group=process_group)
            items = [x for part in parts for x in part]
        for i, a in items:
            self.history.setdefault(i, []).append(a)

    def state_dict(self) -> dict:
        return {"history": {i: list(h) for i, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {int(i): [float(x) for x in h] for i, h in state["history"].items()}

    def write(self, path: str | os.PathLike) -> None:
        """JSON {index: [accuracy, ...]}, written to a temporary file and renamed."""
        from megarl.fileio import atomic_write_text

        atomic_write_text(path, json.dumps({str(i): h for i, h in sorted(self.history.items())}))
