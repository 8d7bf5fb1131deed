"""The wheel's one build step beyond pyproject.toml: it carries the folders tune ships beside its code.

models/ (the default base model, CLIP and judge), concepts/, eval/, recipes/configs/ and dashboard/ live
at the top of the clone, where `make`, the README and an editable install use them. A wheel copies them
into tune/_shipped/ with the same layout, where tune.paths finds them once installed; MANIFEST.in puts
them in the sdist the wheel may be built from.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("models", "concepts", "eval", "recipes/configs", "dashboard")


class BuildPyWithShipped(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the clone's own folders
            return
        for name in SHIPPED:
            if not Path(name).is_dir():
                raise SystemExit(
                    f"setup.py: {name}/ is missing; build the wheel from a complete clone of tune"
                )
            target = Path(self.build_lib, "tune", "_shipped", name)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithShipped})
