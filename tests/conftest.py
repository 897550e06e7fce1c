"""Shared test helpers: the real data folder (optional) and a subprocess runner for stages."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real"


@pytest.fixture()
def real_dir():
    """``../shared/real`` — real public samples; tests using it skip when it is absent."""
    def get(name: str) -> Path:
        path = REAL / name
        if not path.is_dir():
            pytest.skip(f"real data folder {path} is absent")
        return path
    return get


def run_stage(module: str, args: list[str], cwd: Path,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m stages.<module>`` the way dvc.yaml does, from ``cwd``, offline
    (``env``: extra environment variables)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(cwd / ".hf"), **(env or {}))
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
