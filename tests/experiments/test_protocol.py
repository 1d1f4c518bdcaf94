"""The protocol: the method table, the carry rule, counted FLOPs, the screen -> sweep -> test
bookkeeping (runs faked; real runs are the demo's and test_distillation's), the CLI's refusals."""

import json

import numpy as np
import pytest

from topd_jax.experiments import protocol as P
from topd_jax.experiments.__main__ import main
from topd_jax.losses.locators import LOCATORS


def test_the_method_table_is_derived_from_the_locator_and_reading_tables():
    for locator in LOCATORS:
        for form in P.READINGS:
            preset, overrides = P.METHODS[P.method_name(locator, form)]
            assert preset == "topd" and all(o in overrides for o in P.READINGS[form])
            if form not in P.LOCATOR_FREE:
                assert (f"loss.locator={locator}" in overrides) == (locator != "ot")
        assert P.METHODS[P.method_name(locator, None)][0] == "opd_suppress"
    assert P.method_name("ot", "window") == "topd" and P.method_name("oracle", "return") == "topd@oracle/return"
    assert P.method_name("ot_rollout", "relay-m2") == "topd/relay-m2"  # the top-k trigger reads no locator
    assert P.oracle_bound("topd/greedy") == "topd@oracle/greedy" and P.oracle_bound("opd") is None
    assert P.oracle_bound("opd_suppress") == "opd_suppress@oracle"
    assert P.oracle_bound("topd/relay-m2") == "topd@oracle/relay_loc-m2"
    assert P.oracle_bound("topd@ot_rollout/bounded-a0.5-l1") == "topd@oracle/bounded-a0.5-l1"


def test_every_screened_method_builds_a_valid_config_and_has_its_oracle_bound():
    assert len(P.SCREEN) == len(set(P.SCREEN)) and set(P.BASELINES) <= set(P.SCREEN)
    readings = set()
    for method in P.SCREEN:
        config = P.distil_config("s", "t", method=method, seed=0, output_dir="o")
        readings.add(config.loss.guidance if config.loss.guided else None)
        assert method == "opd" or P.oracle_bound(method) in P.METHODS
    # every reading of the loss's table is screened (None: OPD and suppression alone)
    from topd_jax.losses.guidance import GUIDANCE
    assert readings == {None, *GUIDANCE}


def test_counted_flops_of_relay_by_hand():
    relay = P.distil_config("s", "t", method="topd/relay-m2", seed=0, output_dir="o", batch=2)
    # B = 2, P = 14, n = 10, two rounds of: student score 2 N_s B 24, segment 2 N_T B 8,
    # continuation 2 N_s B 10, rescore 2 N_T B 24
    base = 2 * 10 * 48 + 2 * 100 * 48 + 6 * 10 * 48
    per_round = 2 * 10 * 48 + 2 * 100 * 2 * 8 + 2 * 10 * 2 * 10 + 2 * 100 * 48
    assert P.step_flops(relay, 10, 100, 10.0) == pytest.approx(base + 2 * per_round)
    stop = P.distil_config("s", "t", method="topd/relay_stop", seed=0, output_dir="o", batch=2)
    assert P.step_flops(stop, 10, 100, 10.0) == pytest.approx(base + 2 * 10 * 48)


def test_the_carry_rule_reads_the_screen_only():
    screen = {m: {"area": a} for m, a in (("opd", 0.7), ("opd_suppress", 0.69), ("topd", 0.4),
                                          ("topd@ot_rollout", 0.5), ("topd/return", 0.72), ("topd/greedy", 0.6),
                                          ("topd@oracle", 0.9))}
    assert P.choose_carried(screen, 1) == ["opd", "opd_suppress", "topd", "topd@ot_rollout", "topd/return",
                                           "topd@oracle/return"]
    assert P.choose_carried(screen, 2)[4:] == ["topd/return", "topd/greedy", "topd@oracle/return",
                                               "topd@oracle/greedy"]


def test_counted_flops_by_hand():
    config = P.distil_config("s", "t", method="opd", seed=0, output_dir="o", batch=2)
    # B = 2, P = 14, n = 10: 2 N_s B 24 + 2 N_T B 24 + 6 N_s B 24
    assert P.step_flops(config, 10, 100, 10.0) == pytest.approx(2 * 10 * 48 + 2 * 100 * 48 + 6 * 10 * 48)
    topd = P.distil_config("s", "t", method="topd", seed=0, output_dir="o", batch=2)  # ot: M + R = 8, K = 8
    expected = (2 * 10 * 48 + 2 * 100 * 48 + 2 * 100 * 2 * 8 * 8 + 2 * 10 * 2 * 8 * 8 + 6 * 10 * 2 * (24 + 4 * 8))
    assert P.step_flops(topd, 10, 100, 10.0) == pytest.approx(expected)
    ret = P.distil_config("s", "t", method="topd@window_kl/return", seed=0, output_dir="o", batch=2)
    assert P.step_flops(ret, 10, 100, 10.0) == pytest.approx(2 * 10 * 48 + 2 * 100 * 48 + 6 * 10 * 48)


def fake_run(task):
    method, seed, lr, split = task
    best = {"opd": 1e-3, "topd": 3e-4}.get(method, 3e-3)
    area = 0.5 - abs(np.log(lr / best)) / 10 + 0.01 * seed + (0.1 if method == "topd/return" else 0)
    n = 6 if split == "dev" else 12
    return {"accuracy": [(0, 0.1), (5, area)], "metrics": [{"time_step": 0.01}], "step_time": 0.01,
            "step_flops": 1e6, "final": area, "area": area, "correct": np.full(n, area), "stopped_at": 5}


def test_rates_are_chosen_on_the_dev_seed_and_every_test_seed_runs_at_them(tmp_path, monkeypatch):
    calls = []

    class Jobs:
        def __init__(self, *args):
            pass

        def map(self, tasks):
            for task in tasks:
                calls.append(task)
                yield task, fake_run(task)

        def close(self):
            pass

    monkeypatch.setattr(P, "_Jobs", Jobs)
    monkeypatch.setattr(P.models, "cached_sft", lambda config, cache, name: name)
    monkeypatch.setattr(P.models, "load", lambda path: path)
    monkeypatch.setattr(P.models, "accuracy", lambda model, problems: 0.5)
    monkeypatch.setattr(P.models, "malformed", lambda model, problems: 0.0)
    protocol = P.Protocol(seeds=(0, 1, 2), dev_seed=7, screen=("opd", "opd_suppress", "topd", "topd/return"),
                          carry=1, steps=5, eval_every=5, eval_problems=12, dev_problems=6, locator_batches=0)
    results = P.reproduce(str(tmp_path), protocol)
    screen = [c for c in calls if c[1] == 7 and c[2] == 1e-3 and c[0] in protocol.screen][:4]
    assert sorted(c[0] for c in screen) == sorted(protocol.screen) and all(c[3] == "dev" for c in screen)
    assert results["carried"] == ["opd", "opd_suppress", "topd", "topd/return", "topd@oracle/return"]
    # The screen's run is the sweep's 1e-3 cell; an unscreened bound sweeps every rate.
    assert sum(1 for c in calls if c[0] == "opd" and c[1] == 7) == 3
    assert sum(1 for c in calls if c[0] == "topd@oracle/return" and c[1] == 7) == 3
    assert results["chosen_learning_rate"]["opd"] == 1e-3 and results["chosen_learning_rate"]["topd"] == 3e-4
    tests = [c for c in calls if c[3] == "test"]
    assert sorted(tests) == sorted((m, s, results["chosen_learning_rate"][m], "test")
                                   for m in results["carried"] for s in (0, 1, 2))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is True and len(saved["runs"]["topd|1"]["correct"]) == 12
    # Resuming the same protocol repeats nothing; another protocol in the folder is refused.
    calls.clear()
    P.reproduce(str(tmp_path), protocol)
    assert calls == []
    with pytest.raises(ValueError, match="another protocol"):
        P.reproduce(str(tmp_path), P.Protocol(seeds=(0, 1), dev_seed=7, screen=("opd",), locator_batches=0))

    from topd_jax.experiments.rendering import comparisons, summary

    rows = comparisons(results)
    assert rows["opd"]["area_vs_opd"] is None and rows["topd/return"]["area_vs_opd"][0] > 0
    text = summary(results)
    assert "| topd/return | 0.003 |" in text and "Per unit of compute" in text and "PARTIAL" not in text
    table = text.split("Verdict (", 1)[1].splitlines()[4:]
    verdicts = {line.split(" | ")[0][2:]: line.split(" | ")[-1][:-2] for line in table}
    assert verdicts["topd/return"] == "beats OPD"  # +10 points every seed, at equal cost
    assert verdicts["topd"] == "area not distinguishable from OPD"  # the same area on every seed
    assert "oracle locator: a bound, never a win" in verdicts["topd@oracle/return"]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    for argv in (["--seeds", "0,x"], ["--screen", "opd,nope"], ["--dev-seed", "1", "--seeds", "0,1"],
                 ["--learning-rates", "0"], ["--learning-rates", "3e-4"], ["--steps", "0"], ["--workers", "0"]):
        with pytest.raises(SystemExit) as err:
            main(["reproduce", *argv, "--out", str(tmp_path)])
        assert err.value.code == 2
    assert capsys.readouterr().err.count("error:") == 7
    with pytest.raises(ValueError, match="development seed 0 must not be a test seed"):
        P.Protocol(seeds=(0,), dev_seed=0)


def test_longest_first_orders_by_screened_step_time_then_kind():
    from topd_jax.experiments.protocol import longest_first
    tasks = [("opd", 0, 1e-3, "test"), ("topd", 0, 1e-3, "test"), ("topd@ot_rollout/relay_loc-m1", 0, 1e-3, "dev"),
             ("opd_suppress", 1, 1e-3, "test")]
    assert [t[0] for t in longest_first(tasks, {})] == ["topd@ot_rollout/relay_loc-m1", "topd", "opd", "opd_suppress"]
    # Screened: its own step time; unscreened: its kind's mean (opd_suppress: OPD's kind, 0.9 s).
    screen = {"opd": {"step_time": 0.9}, "topd": {"step_time": 0.5}}
    assert [t[0] for t in longest_first(tasks, screen)] == ["opd", "opd_suppress", "topd",
                                                           "topd@ot_rollout/relay_loc-m1"]
