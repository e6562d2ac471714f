"""`megarl select-examples`: rank a training pool by historical variance (1-shot RLVR selection)."""

from __future__ import annotations

import sys

HELP = "rank training examples by the std of their per-epoch training accuracy; print the top K indices"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--acc-log",
        required=True,
        metavar="FILE",
        help="JSON object {example index: [training accuracy per epoch, ...]}, e.g. data/dsr_sub_acc_step_500.json",
    )
    parser.add_argument("--top", type=int, default=1, metavar="K", help="how many indices to print (default 1)")
    parser.add_argument("--scores", action="store_true", help="also print each example's std after its index")


def main(args) -> int:
    from megarl.pipelines.one_shot import variance_scores

    try:
        scores = variance_scores(args.acc_log)
        if not 1 <= args.top <= len(scores):
            raise ValueError(f"--top must be in [1, {len(scores)}] (the pool size), got {args.top}")
    except ValueError as exc:
        print(f"megarl select-examples: error: {exc}", file=sys.stderr)
        return 2
    for index, std in scores[: args.top]:
        print(f"{index}\t{std:.6f}" if args.scores else index)
    return 0
