"""Builds the compiled extensions (`SOURCES`: the native HTTP framers, the log writer's
pipe helper) when it can.

Everything else about the package is in pyproject.toml. The extension is optional, as
aiohttp's and yarl's are: with no C compiler (or no Cython, or EDGEPLANE_NO_EXTENSIONS=1
at install) the build says why on stderr and the install goes on; the gateway then runs
the pure-Python twin (`edgeplane/http/framing.py`) and says so when it starts.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# module -> source: the native HTTP framers, and the access-log writer's pipe helper
SOURCES = {
    "edgeplane.http._cframing": "src/edgeplane/http/_cframing.pyx",
    "edgeplane.runtime._cwrite": "src/edgeplane/runtime/_cwrite.pyx",
}


def _extensions() -> list:
    if os.environ.get("EDGEPLANE_NO_EXTENSIONS", "") not in ("", "0"):
        print("edgeplane: EDGEPLANE_NO_EXTENSIONS is set: not building the compiled framers", file=sys.stderr)
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("edgeplane: Cython is not installed: not building the compiled framers", file=sys.stderr)
        return []
    from setuptools import Extension

    exts = [Extension(name, [source], extra_compile_args=["-O2"]) for name, source in SOURCES.items()]
    return cythonize(exts, compiler_directives={"language_level": "3"}, quiet=True)


class OptionalBuildExt(build_ext):
    """A failed compile is a warning, not a failed install (the pure-Python twin runs)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all (CCompilerError, DistutilsPlatformError...)
            self._skip(exc)

    def build_extension(self, ext) -> None:  # noqa: ANN001  (setuptools' own signature)
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        print(f"edgeplane: the compiled framer was not built ({exc}); the pure-Python twin will run",
              file=sys.stderr)


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
