"""`python -m topd_jax.demo`: the README's first command, at smoke size (--quick, two methods: OPD and
the oracle, whose labels take the longest path; the default adds opd_suppress and topd)."""

import json
import os
import signal

import pytest

from topd_jax.experiments import demo, protocol


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The SFT'd models, trained by the first test and reused by the next."""
    return tmp_path_factory.mktemp("cache")


def test_the_quick_demo_writes_its_table_plots_and_rollout_page(tmp_path, capsys, cache):
    out = tmp_path / "out"
    assert demo.main(["--quick", "--steps", "3", "--methods", "opd,topd@oracle", "--out", str(out), "--cache",
                      str(cache)]) == 0
    printed = capsys.readouterr().out
    for method in ("opd", "topd@oracle"):
        assert f"| {method} | 0: " in printed  # its accuracy along the way, from step 0
    assert "PARTIAL" not in printed and "pts" in printed
    for name in ("accuracy.png", "ot_histograms.png", "locators.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "rollout.html").read_text()
    assert "real divergent state" in page and page.count('class="tok') > 10
    assert "<th>fork label</th>" in page and page.count("<tr><td>") == json.loads(
        (out / "results.json").read_text())["rollout"]["candidates"]
    results = json.loads((out / "results.json").read_text())
    oracle = results["methods"]["topd@oracle"]
    assert set(results["methods"]) == {"opd", "topd@oracle"} and results["partial"] is False
    assert len(oracle["vs_opd"]) == 3 and "ot_auc" in results["locators"]
    assert [s for s, _ in oracle["accuracy"]][-1] == 3 and 0.0 <= oracle["area"] <= 1.0
    assert oracle["low_divergence_share"] is not None
    # A second run reuses the SFT'd models from the cache.
    models = sorted(p.name for p in cache.iterdir())
    assert len(models) == 2 and all((cache / m / "config.json").is_file() for m in models)


def test_a_demo_stopped_by_sigterm_is_marked_partial(tmp_path, capsys, cache, monkeypatch):
    distil = protocol.distil

    def sigterm_during_the_first_method(config, problems, *, eval_every, on_step=None):
        def step(s):
            if s == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the trainer saves and returns after this step
            on_step(s)

        return distil(config, problems, eval_every=eval_every, on_step=step)

    monkeypatch.setattr(protocol, "distil", sigterm_during_the_first_method)
    out = tmp_path / "out"
    assert demo.main(["--quick", "--steps", "3", "--methods", "opd,topd@oracle", "--out", str(out), "--cache",
                      str(cache)]) == 0
    printed = capsys.readouterr().out
    assert "| opd (PARTIAL: stopped at step 1 of 3, accuracy at step 1) |" in printed
    assert "PARTIAL RUN" in printed and "| topd@oracle" not in printed
    results = json.loads((out / "results.json").read_text())
    assert results["partial"] is True and list(results["methods"]) == ["opd"]
    assert results["methods"]["opd"]["partial"] is True and results["methods"]["opd"]["stopped_at"] == 1


def test_bad_arguments_are_refused():
    for argv in (["--steps", "0"], ["--methods", "opd,nope"], ["--learning-rate", "0"]):
        with pytest.raises(SystemExit):
            demo.main(argv)
