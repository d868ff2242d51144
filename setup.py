"""Maps the top-level part folders into the single `agentcg.<part>` namespace.

pyproject.toml holds the metadata; this file only computes the package list, which
setuptools cannot derive on its own when sub-packages live in sibling folders.
"""
from setuptools import find_packages, setup

PARTS = ("controller", "bpf", "gpu", "policies", "profiler")

package_dir = {"agentcg": "agentcg"}
packages = ["agentcg"] + [f"agentcg.{sub}" for sub in find_packages("agentcg")]
for part in PARTS:
    package_dir[f"agentcg.{part}"] = part
    packages.append(f"agentcg.{part}")
    packages += [f"agentcg.{part}.{sub}" for sub in find_packages(part)]

setup(
    package_dir=package_dir,
    packages=packages,
    package_data={"agentcg.bpf": ["*.c", "*.h"]},
)
