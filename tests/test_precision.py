"""Reduced precision only where the hardware has it (fcclip.precision), on this machine's real CPU flags and on
flag strings of other CPUs handed to the same functions."""
import warnings

import numpy as np
import pytest
import torch

import fcclip.precision as precision
from fcclip import Predictor
from fcclip.datasets.synthetic import synthetic_image
from fcclip.precision import cpu_flags, cpu_has_native, resolve_autocast_dtype

# abbreviated /proc/cpuinfo texts of three kinds of CPU
AVX2_ONLY = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx fma avx2 bmi2\n\nprocessor\t: 1\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f avx512_fp16 amx_bf16 amx_tile amx_int8\n"


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which (device, dtype) pairs already warned, so each test sees its own first warning."""
    monkeypatch.setattr(precision, "_warned", set())


def test_flags_parsed_from_cpuinfo_text():
    assert {"avx2", "fma"} <= cpu_flags(AVX2_ONLY)
    assert "avx512_bf16" in cpu_flags(ZEN4)
    assert cpu_flags("processor : 0\nmodel name : something\n") == frozenset()


def test_this_machines_flags_are_the_ones_in_proc_cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    first = next((line for line in text.splitlines() if line.startswith("flags")), None)
    expected = frozenset(first.split(":", 1)[1].split()) if first else frozenset()
    assert cpu_flags() == expected
    # the detection with no argument reads this machine's flags
    assert cpu_has_native(torch.bfloat16) == bool(expected & {"avx512_bf16", "amx_bf16"})
    assert cpu_has_native(torch.float16) == bool(expected & {"avx512_fp16", "amx_fp16"})


@pytest.mark.parametrize(
    ("cpuinfo", "bf16", "fp16"),
    [(AVX2_ONLY, False, False), (ZEN4, True, False), (SAPPHIRE_RAPIDS, True, True)],
    ids=["avx2-only", "zen4", "sapphire-rapids"],
)
def test_native_support_by_flags(cpuinfo, bf16, fp16):
    flags = cpu_flags(cpuinfo)
    assert cpu_has_native(torch.bfloat16, flags) is bf16
    assert cpu_has_native(torch.float16, flags) is fp16
    assert cpu_has_native(torch.float32, flags) is True


def test_unsupported_dtype_is_dropped_with_one_warning(fresh_warnings):
    flags = cpu_flags(AVX2_ONLY)
    with pytest.warns(RuntimeWarning, match="runs in float32") as record:
        assert resolve_autocast_dtype(torch.bfloat16, "cpu", flags) is None
    assert len(record) == 1 and "avx512_bf16" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second request in the same process does not warn again
        assert resolve_autocast_dtype(torch.bfloat16, "cpu", flags) is None
        assert resolve_autocast_dtype(None, "cpu", flags) is None
        assert resolve_autocast_dtype(torch.bfloat16, "cpu", cpu_flags(ZEN4)) is torch.bfloat16
    with pytest.warns(RuntimeWarning, match="float16"):  # another dtype warns on its own
        assert resolve_autocast_dtype(torch.float16, "cpu", cpu_flags(ZEN4)) is None


def test_predictor_runs_float32_unless_this_cpu_has_bf16(tiny_model, fresh_warnings):
    native = cpu_has_native(torch.bfloat16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bf16 = Predictor(tiny_model, "cat; dog", autocast_dtype=torch.bfloat16)
    dropped = [w for w in record if issubclass(w.category, RuntimeWarning) and "float32" in str(w.message)]
    if native:
        assert bf16.autocast_dtype is torch.bfloat16 and not dropped
        return
    assert bf16.autocast_dtype is None and len(dropped) == 1
    fp32 = Predictor(tiny_model, "cat; dog")
    img = synthetic_image(3, 64, 64)
    np.testing.assert_array_equal(bf16(img).panoptic.segment_map, fp32(img).panoptic.segment_map)
