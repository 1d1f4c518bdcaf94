"""topd_jax.plan.lengths and topd_jax.plan.modes: rollout lengths and the sample phase per rollout mode."""

import json
import os

import numpy as np
import pytest

from topd_jax.hardware.chips import CHIPS
from topd_jax.plan import lengths, modes
from topd_jax.plan.bound import Part
from topd_jax.plan.steps import DecodeStep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


def _histogram(tmp_path, data, name="lengths.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_each_form_parses():
    assert lengths.parse_lengths("max") == lengths.Lengths("max", "max")
    parsed = lengths.parse_lengths("lognormal:3276.8,0.8")
    assert (parsed.form, parsed.mean, parsed.sigma, parsed.spec) == ("lognormal", 3276.8, 0.8, "lognormal:3276.8,0.8")


def test_a_histogram_file_parses_and_caps(tmp_path):
    path = _histogram(tmp_path, {"lengths": [2, 5, 40], "counts": [1, 2, 1]})
    parsed = lengths.parse_lengths(path)
    assert (parsed.form, parsed.values, parsed.counts) == ("histogram", (2, 5, 40), (1.0, 2.0, 1.0))
    f = lengths.cdf(parsed, 10)  # 40 counts as the cap
    assert f.tolist() == [0, 0, 0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75, 0.75, 1.0]
    assert lengths.expected_length(f) == pytest.approx((2 + 2 * 5 + 10) / 4)


@pytest.mark.parametrize("spec, message", [
    ("", "lengths '': unknown; use max, lognormal:MEAN,SIGMA or a PATH.json histogram"),
    ("uniform:3", "lengths 'uniform:3': unknown; use max, lognormal:MEAN,SIGMA or a PATH.json histogram"),
    ("lognormal:", "lengths 'lognormal:': expected lognormal:MEAN,SIGMA (two numbers), e.g. lognormal:3276.8,0.8"),
    ("lognormal:100", "lengths 'lognormal:100': expected lognormal:MEAN,SIGMA (two numbers)"),
    ("lognormal:1,2,3", "lengths 'lognormal:1,2,3': expected lognormal:MEAN,SIGMA (two numbers)"),
    ("lognormal:a,1", "lengths 'lognormal:a,1': MEAN must be a number, got 'a'"),
    ("lognormal:100,x", "lengths 'lognormal:100,x': SIGMA must be a number, got 'x'"),
    ("lognormal:-5,1", "lengths 'lognormal:-5,1': MEAN must be > 0, got -5"),
    ("lognormal:100,0", "lengths 'lognormal:100,0': SIGMA must be > 0, got 0"),
    ("lognormal:inf,1", "lengths 'lognormal:inf,1': MEAN must be > 0, got inf"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError) as err:
        lengths.parse_lengths(spec)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("data, message", [
    (None, "No such file or directory"),
    ("{not json", "not JSON: "),
    ({"lengths": [1]}, 'expected {"lengths": [...], "counts": [...]}'),
    ([1, 2], 'expected {"lengths": [...], "counts": [...]}'),
    ({"lengths": [1, 2], "counts": [1]}, '"lengths" and "counts" must be non-empty lists of one size'),
    ({"lengths": [], "counts": []}, '"lengths" and "counts" must be non-empty lists of one size'),
    ({"lengths": [0, 2], "counts": [1, 1]}, "a length must be a whole number of tokens >= 1, got 0"),
    ({"lengths": [1.5], "counts": [1]}, "a length must be a whole number of tokens >= 1, got 1.5"),
    ({"lengths": [3], "counts": [-1]}, "a count must be a number >= 0, got -1"),
    ({"lengths": [3], "counts": ["2"]}, "a count must be a number >= 0, got '2'"),
    ({"lengths": [3, 4], "counts": [0, 0]}, "the counts sum to 0"),
])
def test_bad_histograms_are_one_line_errors(tmp_path, data, message):
    path = str(tmp_path / "missing.json") if data is None else _histogram(tmp_path, data)
    with pytest.raises(ValueError) as err:
        lengths.parse_lengths(path)
    text = str(err.value)
    assert text.startswith(f"lengths {path!r}: ") and message in text and "\n" not in text


def test_max_runs_every_row_to_the_cap():
    f = lengths.cdf(lengths.parse_lengths("max"), 24)
    assert lengths.expected_length(f) == 24 and lengths.expected_max(f, 128) == 24
    assert lengths.expected_square(f) == 24 ** 2


def test_lognormal_mean_is_its_mean_before_the_cap():
    """E[ceil X] is MEAN + about half a token when the cap is far; the cap only lowers it."""
    far = lengths.cdf(lengths.parse_lengths("lognormal:300,0.5"), 100_000)
    assert lengths.expected_length(far) == pytest.approx(300.5, abs=0.1)
    capped = lengths.cdf(lengths.parse_lengths("lognormal:300,0.5"), 400)
    assert lengths.expected_length(capped) < 300 and capped[0] == 0 and capped[-1] == 1
    assert np.all(np.diff(capped) >= 0)


def test_expected_max_by_hand():
    """Lengths 1 or 3 with equal odds, cap 4, 2 draws: the max is 1 only when both are 1, so
    E[max] = 1 / 4 + 3 x 3 / 4 = 2.5."""
    f = lengths.cdf(lengths.Lengths("h", "histogram", values=(1, 3), counts=(1.0, 1.0)), 4)
    assert lengths.expected_max(f, 2) == pytest.approx(2.5)
    assert lengths.expected_max(f, 1) == pytest.approx(lengths.expected_length(f)) == pytest.approx(2.0)


def test_expected_max_agrees_with_monte_carlo():
    spec, cap, draws = lengths.parse_lengths("lognormal:200,0.9"), 512, 16
    mu = np.log(200) - 0.9 ** 2 / 2
    x = np.random.default_rng(0).lognormal(mu, 0.9, size=(100_000, draws))
    sampled = np.minimum(cap, np.maximum(1, np.ceil(x)))
    f = lengths.cdf(spec, cap)
    assert lengths.expected_max(f, draws) == pytest.approx(sampled.max(axis=1).mean(), rel=0.005)
    assert lengths.expected_length(f) == pytest.approx(sampled.mean(), rel=0.005)
    assert lengths.expected_square(f) == pytest.approx((sampled ** 2).mean(), rel=0.01)


def _two_lengths():
    """Lengths 2 or 6, equal odds, cap 8: E[L] = 4, E[L^2] = 20."""
    return lengths.cdf(lengths.Lengths("h", "histogram", values=(2, 6), counts=(1.0, 1.0)), 8)


def test_schedules_by_hand():
    f = _two_lengths()
    static = modes.static_schedule(f, rows=4, slots=4, prompt=10, check_every=8)
    assert static.steps == pytest.approx(2 + 4 * (1 - 0.5 ** 4))  # 5.75: 6 unless all four rows are 2
    assert static.filled == pytest.approx(10 + 5.75 / 2)
    # ceil(B E[L] / S) + B (c / 2) / S; the length-biased mean filled length P + E[L^2] / (2 E[L]).
    continuous = modes.continuous_schedule(f, rows=4, slots=4, prompt=10, check_every=8)
    assert (continuous.steps, continuous.filled) == (4 + 4, 10 + 20 / 8)
    assert modes.continuous_schedule(f, rows=4, slots=2, prompt=10, check_every=8).steps == 8 + 8
    assert modes.continuous_schedule(f, rows=3, slots=2, prompt=10, check_every=2).steps == 6 + 1.5
    produced = modes.produced_schedule(f, rows=4, slots=4, prompt=10, check_every=8)
    assert (produced.steps, produced.filled) == (4, continuous.filled)


def _step(index, flops, hbm, coll):
    return DecodeStep("student", 8, flops, hbm, {"all-gather": coll}, 0.0, index=index)


def test_a_step_is_affine_between_its_two_compiled_lengths():
    first, mid = _step(10, 1.0, 100.0, 5.0), _step(14, 3.0, 140.0, 5.0)
    assert modes.step_at(mid, first, 12) == pytest.approx((2.0, 120.0, 5.0))
    assert modes.step_at(mid, first, 14) == pytest.approx((3.0, 140.0, 5.0))
    assert modes.step_at(mid, None, 11) == (3.0, 140.0, 5.0)  # one step: taken as it is


def test_sample_modes_multiply_the_steps_and_bound_each_mode():
    f = _two_lengths()
    first, mid = _step(10, 1e9, 1e6, 0.0), _step(14, 2e9, 2e6, 0.0)  # mid: P + N / 2 for N = 8
    prefill = Part("prefill", 5e9, 1e6)
    rows = modes.sample_modes(f, rows=4, slots=4, prompt=10, check_every=8, devices=2, program=(1e10, 1e7, 0.0),
                              mid=mid, first=first, prefill=prefill,
                              decode=lambda steps, filled: Part("decode step", 1e9, filled * 1e5, steps))
    assert [m.name for m in rows] == ["static", "continuous", "produced"]
    static, continuous, produced = rows
    assert static.totals[0] == pytest.approx(1e10 + (5.75 - 1) * (1e9 + (12.875 - 10) * 0.25e9))
    assert continuous.totals[1] == pytest.approx(1e7 + 7 * (1e6 + 2.5 * 0.25e6))
    assert all(m.tokens == 4 * 4 / 2 for m in rows)  # B E[L] / n tokens whatever the mode
    chip = CHIPS["v5p"]
    step = max(1e9 / chip.peak_flops, 12.5e5 / chip.hbm_bandwidth)
    assert continuous.bound.seconds(chip) == pytest.approx(prefill.seconds(chip) + 8 * step)
    assert produced.bound.seconds(chip) == pytest.approx(prefill.seconds(chip) + 4 * step)


def test_the_rollout_mode_is_the_configs():
    from topd_jax.trainer.config import load_config

    assert modes.check_mode(load_config(None, []).rollout.mode) == "continuous"  # the default
    assert modes.check_mode(load_config(TINY, []).rollout.mode) == "static"  # the tiny CPU config's
    with pytest.raises(ValueError, match="^rollout.mode: unknown 'paged'; choose from static, continuous$"):
        modes.check_mode("paged")


@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
@pytest.mark.usefixtures("tpu_compile_env")
def test_the_lengths_option_reaches_the_plan(tmp_path, capsys):
    from topd_jax.plan.cli import main

    out = tmp_path / "plan.json"
    assert main(["--config", TINY, "--topology", "v5e:2x2", "--phases", "sample", "--lengths", "lognormal:10,0.8",
                 "--json", str(out), f"output_dir={tmp_path}", "rollout.mode=static"]) == 0
    printed = capsys.readouterr().out
    assert "Sample phase per rollout mode at lengths lognormal:10,0.8" in printed
    assert "| static *" in printed and "| continuous " in printed and "| produced " in printed
    plan = json.loads(out.read_text())
    sampling = plan["sampling"]
    assert sampling["lengths"] == "lognormal:10,0.8" and sampling["rollout_mode"] == "static"
    assert (sampling["rows"], sampling["slots"], sampling["cap"], sampling["check_every"]) == (8, 8, 24, 8)
    f = lengths.cdf(lengths.parse_lengths("lognormal:10,0.8"), 24)
    static, continuous = sampling["modes"]["static"], sampling["modes"]["continuous"]
    assert static["decode_steps"] == pytest.approx(lengths.expected_max(f, 8))
    assert continuous["decode_steps"] == pytest.approx(np.ceil(lengths.expected_length(f)) + 4)
    (sample,) = plan["phases"]
    assert sample["roofline_s"] == pytest.approx(static["roofline_s"]) and plan["step"]["rollout_mode"] == "static"
    assert sample["decode_tokens_per_device"] == pytest.approx(8 * lengths.expected_length(f) / 4)
    # Fewer steps than the full loop: the static mode's sample row is below the loop run to the cap.
    assert 0 < static["roofline_s"] < max(sample["with_loops"]["hbm_bytes"] / plan["chip_figures"]["hbm_bandwidth"],
                                          sample["with_loops"]["tflop"] * 1e12 / plan["chip_figures"]["peak_flops"],
                                          sample["with_loops"]["collective_bytes"] / plan["chip_figures"]["ici_bandwidth"])
    for m in sampling["modes"].values():
        assert 0 < m["bound_s"] <= m["roofline_s"]
