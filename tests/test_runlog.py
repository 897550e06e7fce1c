"""The shared CLI plumbing: known-harmless third-party messages are silenced exactly, and
nothing else is."""
from __future__ import annotations

import logging
import warnings

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
