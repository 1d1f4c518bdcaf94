"""The benchmark scripts run end to end at their smoke sizes (their figures are not asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A line each script prints only after it measured both sides of its comparison.
EXPECTED = {
    "bench_loss.py": "ratio topd/opd",
    "bench_model.py": "jax / torch throughput",
    "bench_sampling.py": "continuous / static finished tokens/s",
    "bench_step.py": "TOPD / OPD step time",
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_runs_at_quick_size(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert EXPECTED[script] in result.stdout, result.stdout[-2000:]
