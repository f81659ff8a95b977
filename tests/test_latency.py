"""The latency model: the fit, the per-call estimate, profiling a real engine, storage and Info."""

import json
import math
import shutil
import subprocess
import sys

import pytest

from engine import latency
from engine.hf import HFEngine
from engine.latency import LatencyModel


def test_fit_recovers_the_coefficients_of_eq_5():
    truth = LatencyModel(a=2e-4, b=3e-3, c=0.05, d=1.5)
    samples = [(i, k, truth.ms(i, k)) for i in (1, 2, 8, 32, 64) for k in (0, 16, 128)]
    fitted = latency.fit(samples, measured_on="synthetic")
    for name in "abcd":
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6, abs=1e-9)
    assert fitted.r2 == pytest.approx(1.0)
    assert fitted.measured_on == "synthetic"


def test_fit_reports_a_poor_fit():
    noise = [(i, k, [9.0, 1.0, 5.0, 0.0, 7.0, 2.0][(i + k) % 6]) for i in (1, 2, 3, 4) for k in (0, 1, 2)]
    assert latency.fit(noise).r2 < 0.5


def test_call_estimate_sums_the_forward_passes():
    model = LatencyModel(a=1.0, b=10.0, c=100.0, d=1000.0)
    # A Prefill of 3 tokens on a cache of 5, then two decoded tokens at caches of 8 and 9.
    expected = model.ms(3, 5) + model.ms(1, 8) + model.ms(1, 9)
    assert model.call_ms(base_len=5, new_tokens=3, forwards=3) == pytest.approx(expected)
    # A Decode from a cache of 7: single-token forwards only.
    assert model.call_ms(base_len=7, new_tokens=0, forwards=2) == pytest.approx(model.ms(1, 7) + model.ms(1, 8))
    assert model.call_ms(base_len=4, new_tokens=0, forwards=0) == 0.0


def test_proto_round_trip():
    model = LatencyModel(1e-5, -2e-5, 0.03, 1.2, r2=0.97, measured_on="hf cpu/float32")
    assert LatencyModel.from_proto(model.to_proto()) == model


def test_profile_times_every_grid_point_on_a_real_cache(engines):
    engine = engines["slm"]
    sessions_before = len(engine.sessions)
    samples = latency.profile(engine, n_inf=(1, 4, 16), n_kv=(0, 8, 32), repeats=2)
    assert [(i, k) for i, k, _ in samples] == [(i, k) for k in (0, 8, 32) for i in (1, 4, 16)]
    assert all(ms > 0 for _, _, ms in samples)
    assert len(engine.sessions) == sessions_before  # its sessions are released
    assert math.isfinite(latency.fit(samples).r2)


@pytest.fixture
def model_copy(model_paths, tmp_path):
    path = tmp_path / "slm"
    shutil.copytree(model_paths["slm"], path)
    return path


def test_the_engine_reports_the_fit_of_its_own_configuration(model_copy):
    assert not HFEngine(model_copy, role="slm").info().HasField("latency_model")
    fit = LatencyModel(1e-5, 2e-5, 0.03, 1.2, r2=0.97, measured_on="test")
    fit.save(model_copy, latency.key("hf", "cpu", "float32"))
    LatencyModel(9.0, 9.0, 9.0, 9.0).save(model_copy, latency.key("hf", "cuda:1", "bfloat16"))
    assert set(json.loads((model_copy / "latency.json").read_text())) == {"hf-cpu-float32", "hf-cuda-bfloat16"}
    info = HFEngine(model_copy, role="slm").info()
    assert LatencyModel.from_proto(info.latency_model) == fit
    assert LatencyModel.load(model_copy, "hf-cuda-bfloat16").a == 9.0
    assert LatencyModel.load(model_copy, "vllm-cpu-float32") is None


def test_an_unreadable_file_is_ignored_with_a_warning(model_copy, caplog):
    (model_copy / "latency.json").write_text("{not json")
    assert not HFEngine(model_copy, role="slm").info().HasField("latency_model")
    assert "ignoring unreadable" in caplog.text


def test_the_committed_pair_is_profiled_with_a_good_fit():
    from engine.default_models import trained_models_dir

    for role in ("slm", "llm"):
        fit = LatencyModel.load(trained_models_dir() / f"rstitch-{role}", "hf-cpu-float32")
        assert fit is not None, f"models/rstitch-{role}/latency.json: run python -m engine.latency"
        assert fit.r2 >= 0.95
        assert fit.ms(1, 64) > 0 and fit.ms(32, 0) > fit.ms(1, 0)


def test_profiling_command_prints_and_stores_the_fit(model_copy, tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine.latency", "--role", "slm", "--model", str(model_copy),
                          "--repeats", "1", "--write", "--plot", str(tmp_path / "fit.png")],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "T(N_inf, N_kv) =" in out and "R^2 =" in out
    stored = LatencyModel.load(model_copy, "hf-cpu-float32")
    assert stored is not None and f"{stored.r2:.4f}" in out
    assert (tmp_path / "fit.png").stat().st_size > 0
