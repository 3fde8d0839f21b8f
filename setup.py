"""Build hook (the project's metadata lives in pyproject.toml).

The Metal kernel sources have one copy in git, the top-level `metal/` folder; a wheel ships them
as `gptoss_mlx/metal/*.metal`, where `gptoss_mlx.kernels.sources` finds them when installed.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "gptoss_mlx" / "metal"
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted((ROOT / "metal").glob("*.metal")):
            shutil.copy2(f, target / f.name)


setup(cmdclass={"build_py": BuildPyWithKernels})
