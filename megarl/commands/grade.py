"""`megarl grade FILE`: grade model responses against reference answers, JSON lines in and out.

Each input line is a JSON object with "response" (the model output) and "answer" (the
reference; a JSON number is accepted and used as written). For each input line, in order, one
JSON line goes to stdout: {"correct": bool, "extracted": str | null, "reason": str}. Grading
runs in the isolated worker pool (megarl.rewards.grader), so hostile responses cost at most
the timeout each. Exit status 0 when every line was graded (wrong answers included); on a
malformed line, the lines before it are graded and printed, a message naming the line number
goes to stderr, and the exit status is 1. A one-line summary goes to stderr at the end.
"""

from __future__ import annotations

import json
import sys

HELP = "grade JSON lines of {response, answer} with the isolated math grader (FILE or - for stdin)"


def add_arguments(parser) -> None:
    parser.add_argument("file", help="JSON lines file, or - for stdin")
    parser.add_argument("--workers", type=int, default=2, help="grader worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per item before its worker is killed (default 5)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space cap per worker in MiB, 0 for none (default 1024)")
    parser.add_argument("--last-number-fallback", action="store_true",
                        help="accept the last number of a response that states no answer (off by default)")
    parser.add_argument("--batch-size", type=int, default=256, help="lines graded per batch (default 256)")


class _BadLine(ValueError):
    pass


def _parse_line(raw: bytes, lineno: int, source: str) -> tuple[str, str]:
    where = f"{source} line {lineno}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadLine(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise _BadLine(f"{where}: empty line; expected a JSON object with \"response\" and \"answer\"")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _BadLine(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _BadLine(f"{where}: expected a JSON object with \"response\" and \"answer\", got {type(obj).__name__}")
    for key in ("response", "answer"):
        if key not in obj:
            raise _BadLine(f"{where}: missing field \"{key}\"")
    response, answer = obj["response"], obj["answer"]
    if not isinstance(response, str):
        raise _BadLine(f"{where}: \"response\" must be a string, got {type(response).__name__}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise _BadLine(f"{where}: \"answer\" must be a string or a number, got {type(answer).__name__}")
    return response, answer if isinstance(answer, str) else json.dumps(answer)


def main(args) -> int:
    from megarl.rewards.grader import GraderConfig, GraderPool

    if args.batch_size < 1:
        print(f"megarl grade: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        config = GraderConfig(num_workers=args.workers, timeout_s=args.timeout, memory_mb=args.memory_mb,
                              last_number_fallback=args.last_number_fallback)
    except ValueError as e:
        print(f"megarl grade: {e}", file=sys.stderr)
        return 2
    source = "stdin" if args.file == "-" else args.file
    try:
        stream = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as e:
        print(f"megarl grade: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return 2

    out = sys.stdout
    status = 0
    with GraderPool(config) as pool:
        responses: list[str] = []
        answers: list[str] = []

        def flush() -> None:
            if responses:
                for r in pool.grade_batch(responses, answers):
                    out.write(json.dumps({"correct": r.correct, "extracted": r.extracted, "reason": r.reason},
                                         ensure_ascii=False) + "\n")
                out.flush()
                responses.clear()
                answers.clear()

        try:
            for lineno, raw in enumerate(stream, start=1):
                try:
                    response, answer = _parse_line(raw.rstrip(b"\r\n"), lineno, source)
                except _BadLine as e:
                    flush()
                    print(f"megarl grade: {e}", file=sys.stderr)
                    status = 1
                    break
                responses.append(response)
                answers.append(answer)
                if len(responses) >= args.batch_size:
                    flush()
            else:
                flush()
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
        s = pool.stats
    print(f"megarl grade: {s.graded} graded, {s.correct} correct, {s.timeouts} timeouts, "
          f"{s.crashes} crashes, {s.memory_errors} over memory, {s.errors} errors", file=sys.stderr)
    return status
