"""Build steps that pyproject.toml cannot express: the gRPC stubs generated from proto/ and the
native extension under native/."""
import glob
import os
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_protos():
    """Compile proto/clowder/v1/*.proto into the importable package clowder.v1."""
    protos = sorted(glob.glob(os.path.join(HERE, "proto", "clowder", "v1", "*.proto")))
    if not protos:
        return
    out = HERE
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(HERE, "proto"),
           f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    subprocess.run(cmd, check=True)
    for pkg in ("clowder", os.path.join("clowder", "v1")):
        init = os.path.join(HERE, pkg, "__init__.py")
        if not os.path.exists(init):
            with open(init, "w") as f:
                f.write('"""Generated from proto/ by setup.py; do not edit."""\n')


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


native = Extension(
    "clowderd._native",
    sources=sorted(glob.glob("native/*.c")),
    depends=sorted(glob.glob("native/*.h")),  # a header edit alone must rebuild the extension too
    include_dirs=["native"],
    libraries=["crypto", "pthread"],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    generate_protos()  # so that package discovery sees clowder/v1 on a clean checkout
    setup(ext_modules=[native] if glob.glob("native/*.c") else [], cmdclass={"build_py": BuildPyWithProtos})
