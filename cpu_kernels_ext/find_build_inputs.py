"""Prints, for CMakeLists.txt, where the build's inputs are installed in this Python environment.

    python find_build_inputs.py DEVEL_DISTRIBUTION RUNTIME_DISTRIBUTION

Output (a CMake list): the directory holding `oneapi/dnnl/dnnl.hpp` in the PyPI package
DEVEL_DISTRIBUTION, the path of `libdnnl.so.3` in RUNTIME_DISTRIBUTION, and jaxlib's directory of
XLA FFI headers (what `jax.ffi.include_dir()` returns, found without importing jax). Located
through the packages' installed-file records, so it works in pip's isolated build environment,
whose packages are not under sys.prefix. Exits 1 with the reason when something is missing.
"""

import importlib.metadata
import importlib.util
import os
import sys


def installed_file(distribution: str, suffix: str) -> str:
  """The absolute path of the file of `distribution` whose path ends with `suffix`."""
  try:
    files = importlib.metadata.files(distribution) or []
  except importlib.metadata.PackageNotFoundError:
    sys.exit(f"the Python package {distribution} is not installed in the build environment")
  for file in files:
    if file.as_posix().endswith(suffix):
      return os.path.abspath(str(file.locate()))
  sys.exit(f"{distribution} has no file {suffix}")


def main(devel: str, runtime: str) -> None:
  header = installed_file(devel, "/oneapi/dnnl/dnnl.hpp")
  include = os.path.dirname(os.path.dirname(os.path.dirname(header)))
  library = installed_file(runtime, "/libdnnl.so.3")
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    sys.exit("jaxlib is not installed in the build environment")
  ffi = os.path.join(list(spec.submodule_search_locations)[0], "include")
  if not os.path.isfile(os.path.join(ffi, "xla", "ffi", "api", "ffi.h")):
    sys.exit(f"jaxlib has no XLA FFI headers in {ffi}")
  print(";".join((include, library, ffi)), end="")


if __name__ == "__main__":
  main(*sys.argv[1:])
