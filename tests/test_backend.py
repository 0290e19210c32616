"""The backend shim: names, the environment variable, and what happens without a GPU.

The shim caches its CuPy probe in module globals; the autouse fixture below resets them for
every test (monkeypatch restores the real values afterwards), and fake `cupy` modules in
sys.modules stand in for the cases this machine cannot show.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from cnn_gpu import backend
from tests.conftest import requires_gpu


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_reason", None)
    monkeypatch.setattr(backend, "_chosen", None)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)


def _fake_cupy(monkeypatch, device_count):
    """Put a stand-in cupy in sys.modules whose getDeviceCount returns or raises."""
    def get_device_count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    fake = SimpleNamespace(__version__="0.0-fake",
                           cuda=SimpleNamespace(runtime=SimpleNamespace(
                               getDeviceCount=get_device_count)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


def test_numpy_by_name_any_case():
    assert backend.resolve_backend("numpy") == "numpy"
    assert backend.resolve_backend(" NumPy ") == "numpy"
    assert backend.module_for("numpy") is np


def test_auto_picks_cupy_only_when_it_can_run():
    expected = "cupy" if backend.cupy_available() else "numpy"
    assert backend.resolve_backend("auto") == expected
    assert backend.resolve_backend(None) == expected  # no env var: auto


def test_unknown_name_is_a_value_error():
    with pytest.raises(ValueError, match="must be one of"):
        backend.resolve_backend("torch")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "numpy")
    assert backend.default_backend() == "numpy"
    monkeypatch.setenv(backend.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=backend.ENV_VAR):
        backend.default_backend()


def test_set_backend_overrides_the_environment_until_reset(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "tpu")
    assert backend.set_backend("numpy") == "numpy"
    assert backend.default_backend() == "numpy"
    backend.set_backend(None)
    with pytest.raises(ValueError):
        backend.default_backend()


def test_cupy_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    assert not backend.cupy_available()
    assert "not installed" in backend.cupy_unavailable_reason()
    assert backend.resolve_backend("auto") == "numpy"
    with pytest.raises(backend.BackendUnavailableError, match="not installed"):
        backend.resolve_backend("cupy")


def test_cupy_installed_but_the_driver_fails(monkeypatch):
    _fake_cupy(monkeypatch, RuntimeError("cudaErrorInsufficientDriver"))
    with pytest.raises(backend.BackendUnavailableError, match="cudaErrorInsufficientDriver"):
        backend.require_cupy()
    assert backend.resolve_backend("auto") == "numpy"


def test_cupy_installed_but_no_device(monkeypatch):
    _fake_cupy(monkeypatch, 0)
    with pytest.raises(backend.BackendUnavailableError, match="no CUDA device is present"):
        backend.resolve_backend("cupy")


def test_cupy_with_a_device_is_chosen_by_auto(monkeypatch):
    fake = _fake_cupy(monkeypatch, 1)
    assert backend.resolve_backend("auto") == "cupy"
    assert backend.require_cupy() is fake


def test_this_machine_explains_a_missing_gpu():
    """Without a usable GPU (CuPy missing, no driver, no device), 'cupy' fails with the reason."""
    reason = backend.cupy_unavailable_reason()
    if reason is None:
        pytest.skip("CuPy runs on this machine")
    with pytest.raises(backend.BackendUnavailableError) as info:
        backend.resolve_backend("cupy")
    assert reason in str(info.value)


def test_numpy_arrays_stay_on_numpy():
    a = np.zeros(3)
    assert backend.get_array_module(a) is np
    assert backend.get_array_module(a, None, np.ones(2)) is np
    assert backend.backend_of(a) == "numpy"
    assert backend.to_numpy(a) is a
    assert backend.to_device(a, "numpy") is a


@pytest.mark.gpu
@requires_gpu
def test_cupy_arrays_and_mixing():
    cupy = backend.require_cupy()
    g = cupy.zeros(3)
    assert backend.get_array_module(g) is cupy
    assert backend.backend_of(g) == "cupy"
    np.testing.assert_array_equal(backend.to_numpy(backend.to_device(np.arange(3), "cupy")),
                                  np.arange(3))
    with pytest.raises(TypeError, match="both backends"):
        backend.get_array_module(g, np.zeros(3))
