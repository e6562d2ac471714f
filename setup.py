"""Builds megarl._C: C++ CPU kernels always, CUDA kernels when a CUDA torch and nvcc exist.

MEGARL_SKIP_CUDA_BUILD=1 skips the CUDA kernels even where they could be built.
"""

import glob
import os

from setuptools import setup

from torch.utils import cpp_extension


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    skip_cuda = os.environ.get("MEGARL_SKIP_CUDA_BUILD", "0") == "1"
    with_cuda = bool(cu) and not skip_cuda and cpp_extension.CUDA_HOME is not None
    cxx = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    common = dict(
        name="megarl._C",
        include_dirs=[os.path.join(here, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if with_cuda:
        return cpp_extension.CUDAExtension(
            sources=cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DMEGARL_WITH_CUDA"], "nvcc": ["-O3", "--use_fast_math"]},
            **common,
        )
    return cpp_extension.CppExtension(sources=cpp, extra_compile_args={"cxx": cxx}, **common)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
