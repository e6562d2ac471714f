// The megarl._C Python module: an empty module whose import runs the TORCH_LIBRARY
// registrations of every kernel file in csrc/ (pattern of pytorch/extension-cpp).
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "megarl fused RL ops (schemas in TORCH_LIBRARY(megarl))",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

// Each kernel file adds its schemas with TORCH_LIBRARY_FRAGMENT(megarl, m).
TORCH_LIBRARY(megarl, m) {}
