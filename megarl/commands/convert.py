"""`megarl convert` (also `tools/convert`): HF <-> megatron checkpoints at any TP/PP/VPP.

    megarl convert hf-to-mcore --hf HF_DIR --out MCORE_DIR --tp N --pp M [--vpp K]
    megarl convert mcore-to-hf --mcore MCORE_DIR --out HF_DIR
    megarl convert reshard     --mcore MCORE_DIR --out MCORE_DIR2 --tp N --pp M [--vpp K]
    megarl convert verify      --hf HF_DIR --mcore MCORE_DIR [--tol 1e-4]

Exit status: 0 done (verify: within tolerance), 1 verify over tolerance, 2 refused (bad input,
existing output, unknown architecture, ...; the message says what and where).
"""

from __future__ import annotations

import sys

HELP = "convert checkpoints: HF <-> megatron at any TP/PP (streaming), reshard, verify logits parity"

DTYPES = ("float32", "bfloat16", "float16")


def _layout_args(p) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank (needs pp >= 2)")


def _write_args(p) -> None:
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep their dtypes)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="bytes per output file and bound on the buffered output (e.g. 500MB, 2GB; default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("hf-to-mcore", help="HF safetensors directory -> megatron checkpoint (MCORE_DIR)")
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="MCORE_DIR to write")
    _layout_args(p)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocab padding multiple (times tp), megatron's rule (default 128)")
    _write_args(p)

    p = sub.add_parser("mcore-to-hf", help="megatron checkpoint (any TP/PP) -> HF directory for from_pretrained")
    p.add_argument("--mcore", required=True, help="MCORE_DIR to read")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--no-checksums", action="store_true", help="skip the sha256 check of the input files")
    _write_args(p)

    p = sub.add_parser("reshard", help="megatron checkpoint -> megatron checkpoint with another TP/PP/VPP")
    p.add_argument("--mcore", required=True, help="MCORE_DIR to read")
    p.add_argument("--out", required=True, help="MCORE_DIR to write")
    _layout_args(p)
    p.add_argument("--no-checksums", action="store_true", help="skip the sha256 check of the input files")
    _write_args(p)

    p = sub.add_parser("verify", help="logits parity of a megatron checkpoint against the HF model")
    p.add_argument("--hf", required=True, help="HF model directory (the reference, run by transformers)")
    p.add_argument("--mcore", required=True, help="MCORE_DIR to check")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="pass when max abs diff <= TOL x max abs logits (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=2, help="probe sequences (default 2)")
    p.add_argument("--seq-len", type=int, default=16, help="probe tokens per sequence (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe token ids (default 0)")


def main(args) -> int:
    from megarl.models import convert

    try:
        if args.action == "verify":
            result = convert.verify_mcore_dir(args.hf, args.mcore, tol=args.tol, batch_size=args.batch_size,
                                              seq_len=args.seq_len, seed=args.seed)
            print(result.summary())
            return 0 if result.passed else 1
        common = dict(dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                      progress=not args.no_progress)
        if args.action == "hf-to-mcore":
            report = convert.hf_to_mcore_dir(args.hf, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp,
                                             make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                             **common)
        elif args.action == "mcore-to-hf":
            report = convert.mcore_to_hf_dir(args.mcore, args.out, verify_checksums=not args.no_checksums, **common)
        else:
            assert args.action == "reshard", args.action
            report = convert.reshard_mcore_dir(args.mcore, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp,
                                               verify_checksums=not args.no_checksums, **common)
    except ValueError as e:
        print(f"megarl convert {args.action}: error: {e}", file=sys.stderr)
        return 2
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(report.summary())
    return 0
