"""The environment of a Python subprocess a test starts: this checkout first on PYTHONPATH, and what
the caller's PYTHONPATH held kept after it (a machine may bring packages that way, e.g. a wheel folder)."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
