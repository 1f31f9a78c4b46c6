"""The public API: every name in __all__ resolves, and heavy libraries load only on demand."""

from __future__ import annotations

import subprocess
import sys

import pytest

import vessel_kit


@pytest.mark.parametrize("name", vessel_kit.__all__)
def test_every_public_name_resolves(name):
    assert getattr(vessel_kit, name) is not None


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'infer_everything'"):
        vessel_kit.infer_everything  # noqa: B018


def test_light_import_does_not_load_torch():
    code = "import sys, vessel_kit; print('torch' in sys.modules, 'albumentations' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_train_is_the_function_even_after_its_module_is_imported():
    code = "import vessel_kit.training, vessel_kit; from vessel_kit import TrainConfig, train; print(callable(train), type(train).__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "function"]
