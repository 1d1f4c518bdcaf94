"""`python -m topd_jax.plan`: bad input is exit 2 in one line before any phase is compiled (exit 1
stays "does not fit")."""

import pytest

from topd_jax.plan import cli, measure


@pytest.mark.parametrize("args, message", [
    (["--json", "MISSING/dir/x.json"], "error: No such file or directory: MISSING/dir"),
    (["--json", "FILE/x.json"], "error: Not a directory: FILE"),
    (["loss.max_candidates=100000"], "error: loss.max_candidates: 100000 positions per rollout, but a rollout has "
                                     "only rollout.max_new_tokens=24 positions; use at most 24"),
    (["--student-layers", "0"], "error: --student-layers must be >= 1, got 0"),
    (["--lengths", "lognormal:3000"], "error: lengths 'lognormal:3000': expected lognormal:MEAN,SIGMA (two numbers), "
                                      "e.g. lognormal:3276.8,0.8"),
    (["--lengths", "MISSING/l.json"], "error: lengths 'MISSING/l.json': No such file or directory"),
])
def test_bad_input_is_exit_2_before_compiling(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(measure, "plan_step", lambda *a, **k: pytest.fail("compiled"))
    (tmp_path / "file").write_text("x")
    paths = {"MISSING": str(tmp_path / "missing"), "FILE": str(tmp_path / "file")}

    def resolve(text):
        for name, path in paths.items():
            text = text.replace(name, path)
        return text

    assert cli.main(["--config", "configs/tiny_cpu.yaml", "--topology", "local", *map(resolve, args)]) == 2
    assert capsys.readouterr().err == resolve(message) + "\n"
    assert not (tmp_path / "missing").exists()


def test_overrides_may_stand_before_and_after_the_options():
    from topd_jax import train

    argv = ["--topology", "local", "steps=3", "--phases", "train", "inference.layout=train", "--buffers", "2"]
    args = cli.parse_args(argv)
    assert args.overrides == ["steps=3", "inference.layout=train"] and args.phases == "train" and args.buffers == 2
    args = train.parse_args(["steps=3", "--config", "configs/tiny_cpu.yaml", "seed=1"])
    assert args.overrides == ["steps=3", "seed=1"] and args.config == "configs/tiny_cpu.yaml"
