"""`python -m topd_jax.demo`: the README's first command, at smoke size (--quick)."""

import json

import pytest

from topd_jax import demo


def test_the_quick_demo_writes_its_table_plots_and_rollout_page(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert demo.main(["--quick", "--steps", "3", "--out", str(out), "--cache", str(cache)]) == 0
    printed = capsys.readouterr().out
    assert "| opd |" in printed and "| topd |" in printed
    for name in ("accuracy.png", "ot_histograms.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "rollout.html").read_text()
    assert "real divergent state" in page and page.count('class="tok') > 10
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"opd", "topd"}
    assert [s for s, _ in results["methods"]["topd"]["accuracy"]][-1] == 3
    assert results["methods"]["topd"]["low_divergence_share"] is not None
    # A second run reuses the SFT'd models from the cache.
    models = sorted(p.name for p in cache.iterdir())
    assert len(models) == 2 and all((cache / m / "config.json").is_file() for m in models)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])
