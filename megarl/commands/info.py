"""`megarl info`: versions, the compiled extension, and which fused kernels exist per device."""

from __future__ import annotations

HELP = "show versions, whether the C++/CUDA extension is built, and which kernels it has"

OPS = ("gae", "group_advantages", "logprob_entropy_fwd", "logprob_entropy_bwd", "checksum")


def add_arguments(parser) -> None:
    pass


def main(args) -> int:
    import importlib.metadata as md
    import platform

    import torch

    import megarl
    from megarl._ext import extension_loaded, has_kernel

    print(f"megarl {megarl.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"cuda available: {torch.cuda.is_available()}")
    for pkg in ("megatron-core", "transformers", "math-verify", "vllm", "nemo-run"):
        try:
            print(f"{pkg}: {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"{pkg}: not installed")
    print(f"extension megarl._C loaded: {extension_loaded()}")
    for op in OPS:
        devices = [d for d in ("cpu", "cuda") if has_kernel(op, d)]
        print(f"  megarl::{op}: {', '.join(devices) or 'torch reference only'}")
    return 0
