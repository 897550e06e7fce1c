"""The shared CLI plumbing: known-harmless third-party messages are silenced exactly, and
nothing else is."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from stages.common.runlog import quiet_known_warnings


def test_exactly_the_known_harmless_messages_are_silenced(caplog):
    quiet_known_warnings()
    quiet_known_warnings()  # idempotent: one filter per logger
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(bnb.filters) == 1
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please", "x")
        bnb.warning("gemv_4bit produced NaN")  # a real problem on the same logger
        logging.getLogger("transformers.trainer_utils").warning(
            "mtime may not be reliable on this filesystem, falling back to numerical ordering")
    assert [r.getMessage() for r in caplog.records] == ["gemv_4bit produced NaN"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_warnings()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
                      "`is_activation_checkpointing` instead.", FutureWarning)
        warnings.warn("`gradient_checkpointing_kwargs` is deprecated and will be removed in v6.",
                      FutureWarning)
        warnings.warn("`torch_dtype` is deprecated and will be removed in v6", FutureWarning)
    assert [str(w.message) for w in caught] == ["`torch_dtype` is deprecated and will be removed in v6"]


def test_dvc_reads_yaml_with_the_c_loader():
    """DVC parses params.yaml once per stage: with ruamel's pure-Python loader a no-op
    `dvc status` of the quickstart DAG took 5.2 s, with the C loader 2.3 s
    (bench/dvc_status.py). ruamel.yaml.clib is pinned in requirements.lock for that."""
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__name__ == "CParser"


def test_run_and_exit_flushes_what_the_stage_wrote_and_leaves_failures_the_ordinary_way(tmp_path):
    """run_and_exit ends a torch stage's process without the interpreter's teardown: what main
    printed and logged is flushed first (exit 0); a StageError and an exception still exit 2
    and 1 with their message."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    log = tmp_path / "stage.log"
    program = f"""
import sys
from stages.common.runlog import StageError, run_and_exit, setup_logging, stage_main

@stage_main
def main():
    print("printed", end="")
    sys.stderr.write("warned")
    setup_logging({str(log)!r}, "demo").info("logged")
    if sys.argv[1] == "stage-error":
        raise StageError("bad input")
    if sys.argv[1] == "crash":
        raise RuntimeError("boom")

run_and_exit(main)
"""

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", program, mode], cwd=root, capture_output=True,
                              text=True, timeout=120)

    ok = run("ok")
    assert (ok.returncode, ok.stdout) == (0, "printed")
    assert ok.stderr.startswith("warned")
    assert "logged" in log.read_text(encoding="utf-8")
    failed = run("stage-error")
    assert failed.returncode == 2 and "error: bad input" in failed.stderr
    crashed = run("crash")
    assert crashed.returncode == 1 and "RuntimeError: boom" in crashed.stderr


def test_off_a_terminal_datasets_progress_bars_are_silenced(tmp_path):
    """trl builds its labels with datasets' map(): six bars per training run filled the
    quickstart's log; off a terminal there are none (datasets imported before or after)."""
    import subprocess
    import sys
    script = ("import datasets\n"
              "from stages.common.runlog import quiet_known_warnings\n"
              "quiet_known_warnings()\n"
              "datasets.Dataset.from_dict({'x': list(range(50))}).map(lambda r: r, desc='Building labels')\n")
    with open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.run([sys.executable, "-c", script], stderr=err, stdout=subprocess.DEVNULL,
                              cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0
    assert "Building labels" not in (tmp_path / "err.txt").read_text(encoding="utf-8")
