"""The install story: what a user without a framework, or with only one, is told and can run."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("integration", "framework", "extra"),
    [
        ("lightning", "lightning", "lightning"),
        ("transformers", "transformers", "transformers"),
        ("accelerate", "accelerate", "accelerate"),
    ],
)
def test_an_integration_without_its_framework_names_the_extra_to_install(
    monkeypatch, integration, framework, extra
):
    # The framework is missing: its modules (and any submodules already imported) resolve to None.
    for name in [name for name in sys.modules if name == framework or name.startswith(framework + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, framework, None)
    monkeypatch.delitem(sys.modules, f"mfu_callbacks.{integration}", raising=False)

    with pytest.raises(ImportError) as caught:
        importlib.import_module(f"mfu_callbacks.{integration}")

    assert isinstance(caught.value, ModuleNotFoundError)
    assert caught.value.name.split(".")[0] == framework
    message = str(caught.value)
    assert f'pip install "mfu-callbacks[{extra}]"' in message
    assert f"mfu_callbacks.{integration}" in message


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Runs an example as `python examples/NAME.py ...` would, in an environment where transformers and
# PEFT are not installed: their imports fail and their distributions are not found (libraries such as
# torchmetrics decide from the installed distributions whether to import transformers).
WITHOUT_TRANSFORMERS = """
import importlib.metadata as metadata, runpy, sys
HIDDEN = {"transformers", "peft"}
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
installed = metadata.distribution
def distribution(name):
    if name.lower() in HIDDEN:
        raise metadata.PackageNotFoundError(name)
    return installed(name)
metadata.distribution = distribution
sys.path.insert(0, sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # two short training runs in subprocesses: about 30 s
@pytest.mark.parametrize(
    "argv",
    [
        ["accelerate_loop.py", "--peak-tflops", "1", "--steps", "6"],
        [
            "lightning_cli.py",
            "fit",
            "--config",
            str(CONFIGS / "lightning.yaml"),
            "--trainer.callbacks.init_args.peak_tflops",
            "1",
            "--trainer.max_steps",
            "6",
        ],
    ],
    ids=["accelerate", "lightning"],
)
def test_the_lightning_and_accelerate_examples_run_without_transformers(tmp_path, argv):
    script = [str(EXAMPLES / argv[0]), *argv[1:]]
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRANSFORMERS, str(EXAMPLES), *script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "MFU report (mfu-callbacks)" in output
    assert "mlp" in output and "attention_scores" in output  # the plain-torch model's parts are named
