"""`python -m topd_jax.demo`: the README's first command, at smoke size (--quick, two methods: OPD and
the oracle, whose labels take the longest path; the default adds opd_suppress and topd)."""

import json
import os
import signal

import pytest

from topd_jax import demo, miniature


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The SFT'd models, trained by the first test and reused by the next."""
    return tmp_path_factory.mktemp("cache")


def test_the_quick_demo_writes_its_table_plots_and_rollout_page(tmp_path, capsys, cache):
    out = tmp_path / "out"
    assert demo.main(["--quick", "--steps", "3", "--methods", "opd,oracle", "--out", str(out), "--cache",
                      str(cache)]) == 0
    printed = capsys.readouterr().out
    for method in ("opd", "oracle"):
        assert f"| {method} |" in printed
    assert "PARTIAL" not in printed and "pts" in printed
    for name in ("accuracy.png", "ot_histograms.png", "locators.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "rollout.html").read_text()
    assert "real divergent state" in page and page.count('class="tok') > 10
    assert "<th>fork label</th>" in page and page.count("<tr><td>") == json.loads(
        (out / "results.json").read_text())["rollout"]["candidates"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"opd", "oracle"} and results["partial"] is False
    assert len(results["methods"]["oracle"]["vs_opd"]) == 3 and "ot_auc" in results["locators"]
    assert [s for s, _ in results["methods"]["oracle"]["accuracy"]][-1] == 3
    assert results["methods"]["oracle"]["low_divergence_share"] is not None
    # A second run reuses the SFT'd models from the cache.
    models = sorted(p.name for p in cache.iterdir())
    assert len(models) == 2 and all((cache / m / "config.json").is_file() for m in models)


def test_a_demo_stopped_by_sigterm_is_marked_partial(tmp_path, capsys, cache, monkeypatch):
    distil = miniature.distil

    def sigterm_during_the_first_method(config, problems, *, eval_every, on_step=None):
        def step(s):
            if s == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the trainer saves and returns after this step
            on_step(s)

        return distil(config, problems, eval_every=eval_every, on_step=step)

    monkeypatch.setattr(miniature, "distil", sigterm_during_the_first_method)
    out = tmp_path / "out"
    assert demo.main(["--quick", "--steps", "3", "--methods", "opd,oracle", "--out", str(out), "--cache",
                      str(cache)]) == 0
    printed = capsys.readouterr().out
    assert "| opd (PARTIAL: stopped at step 1 of 3, accuracy at step 1) |" in printed
    assert "PARTIAL RUN" in printed and "| oracle" not in printed
    results = json.loads((out / "results.json").read_text())
    assert results["partial"] is True and list(results["methods"]) == ["opd"]
    assert results["methods"]["opd"]["partial"] is True and results["methods"]["opd"]["stopped_at"] == 1


def test_bad_arguments_are_refused():
    for argv in (["--steps", "0"], ["--methods", "opd,nope"]):
        with pytest.raises(SystemExit):
            demo.main(argv)
