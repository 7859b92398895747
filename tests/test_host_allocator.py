"""The commands run TensorFlow on its BFC host allocator (llm_unitscale.host_allocator), unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from llm_unitscale import host_allocator

#: A program that runs a trivial command through the commands' guard, allocates host memory and prints whether
#: TensorFlow's host allocator keeps statistics (only its BFC allocator does: malloc's raises ValueError).
THROUGH_THE_GUARD = """
import argparse, sys
from llm_unitscale import cli

def command(args):
    import tensorflow as tf
    x = tf.random.normal([256, 256])
    _ = (x @ x).numpy()
    try:
        tf.config.experimental.get_memory_info("CPU:0")
        print("bfc")
    except ValueError:
        print("malloc")
    return 0

sys.exit(cli._guard(command, argparse.Namespace(cache=sys.argv[1])))
"""


def allocator_of_a_command(tmp_path: Path, user_setting: str | None) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(host_allocator.ENV, None)
    if user_setting is not None:
        env[host_allocator.ENV] = user_setting
    result = subprocess.run([sys.executable, "-c", THROUGH_THE_GUARD, str(tmp_path / "cache")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize(("user_setting", "expected"), [(None, "bfc"), ("false", "malloc"), ("true", "bfc")])
def test_commands_allocate_host_memory_with_bfc_unless_the_user_chose(tmp_path: Path, user_setting: str | None,
                                                                      expected: str) -> None:
    assert allocator_of_a_command(tmp_path, user_setting) == expected


def test_enable_sets_the_switch_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(host_allocator.ENV, raising=False)
    assert host_allocator.enable() is True
    assert os.environ[host_allocator.ENV] == "true"
    monkeypatch.setenv(host_allocator.ENV, "0")
    assert host_allocator.enable() is False
    assert os.environ[host_allocator.ENV] == "0"
