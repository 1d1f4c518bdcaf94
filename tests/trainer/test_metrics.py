"""MetricsLogger: one JSON line per step, resume truncation, TensorBoard scalars and histograms."""

import glob
import json
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from topd_jax.trainer.metrics import MetricsLogger


def _logger(tmp_path, **kwargs):
    kwargs.setdefault("total_steps", 10)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("tensorboard", False)
    return MetricsLogger(tmp_path, **kwargs)


def _lines(tmp_path):
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _events(tmp_path):
    """All events of the TensorBoard files: TFRecord frames of u64 length, u32 crc, data, u32 crc."""
    events = []
    for path in sorted(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12 : offset + 12 + length])
            events.append(event)
            offset += 12 + length + 4
    return events


def test_one_line_per_step_with_the_given_keys(tmp_path):
    with _logger(tmp_path) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": np.float32(0.5 * step), "num_candidates": np.int32(4)})
    lines = _lines(tmp_path)
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert lines[2] == {"step": 3, "loss": 1.5, "num_candidates": 4}


def test_non_finite_values_become_null_and_arrays_lists(tmp_path):
    with _logger(tmp_path) as logger:
        logger.log(1, {"loss": float("nan"), "grad_norm": np.float32(np.inf), "hist": np.array([1.0, np.nan, 3.0])})
    raw = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    assert json.loads(raw) == {"step": 1, "loss": None, "grad_norm": None, "hist": [1.0, None, 3.0]}


def test_a_matrix_metric_is_refused_by_name(tmp_path):
    with _logger(tmp_path) as logger, pytest.raises(ValueError, match="'weights'"):
        logger.log(1, {"weights": np.zeros((2, 2))})


def test_resume_keeps_steps_up_to_start_step_then_appends(tmp_path):
    with _logger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
    with _logger(tmp_path, start_step=3) as logger:
        assert [line["step"] for line in _lines(tmp_path)] == [1, 2, 3]
        logger.log(4, {"loss": 40.0})
    assert [(line["step"], line["loss"]) for line in _lines(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_resume_drops_a_half_written_last_line_and_notes_it(tmp_path):
    with _logger(tmp_path) as logger:
        for step in (1, 2):
            logger.log(step, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    with _logger(tmp_path, start_step=3) as logger:
        logger.log(3, {"loss": 3.0})
    assert [line["step"] for line in _lines(tmp_path)] == [1, 2, 3]
    assert "unparsable" in (tmp_path / "events.log").read_text()


def test_resume_without_a_metrics_file_starts_one(tmp_path):
    with _logger(tmp_path, start_step=7) as logger:
        logger.log(8, {"loss": 1.0})
    assert [line["step"] for line in _lines(tmp_path)] == [8]


def test_start_step_zero_starts_a_fresh_file(tmp_path):
    with _logger(tmp_path) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": 1.0})
    with _logger(tmp_path) as logger:
        logger.log(1, {"loss": 2.0})
    assert _lines(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_disabled_logger_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with MetricsLogger(out, total_steps=3, enabled=False) as logger:
        logger.log(1, {"loss": 1.0})
        logger.warn("ignored")
    assert not out.exists()


def test_tensorboard_holds_scalars_and_ot_histograms(tmp_path):
    counts = np.zeros(20, np.float32)
    counts[[0, 5, 19]] = [2.0, 3.0, 1.0]
    with _logger(tmp_path, tensorboard=True) as logger:
        logger.log(1, {"loss": 0.25, "low_divergence_share": np.float32(0.75), "ot_hist_candidates": counts})
        logger.log(2, {"loss": 0.125, "other_vector": np.ones(3)})
    values = [(event.step, value) for event in _events(tmp_path) for value in event.summary.value]
    scalars = {(step, v.tag): v.simple_value for step, v in values if v.WhichOneof("value") == "simple_value"}
    assert scalars == {(1, "loss"): 0.25, (1, "low_divergence_share"): 0.75, (2, "loss"): 0.125}
    (histogram,) = [(step, v.histo) for step, v in values if v.WhichOneof("value") == "histo"]
    step, histo = histogram
    assert step == 1 and histo.num == 6.0
    np.testing.assert_allclose(histo.bucket_limit, np.linspace(0.1, 2.0, 20), rtol=1e-6)
    np.testing.assert_allclose(histo.bucket, counts)
    assert (histo.min, histo.max) == (0.0, 2.0)
    assert histo.sum == pytest.approx(2 * 0.05 + 3 * 0.55 + 1 * 1.95)


def _scalars_as_tensorboard_shows_them(tmp_path, tag):
    """Scalars after TensorBoard's purge: a SessionLog START at step s drops earlier events of steps >= s."""
    shown = {}
    for event in _events(tmp_path):
        if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
            shown = {step: value for step, value in shown.items() if step < event.step}
        shown.update({event.step: v.simple_value for v in event.summary.value if v.tag == tag})
    return shown


def test_tensorboard_resume_purges_the_recomputed_steps(tmp_path):
    with _logger(tmp_path, tensorboard=True) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": float(step)})
    with _logger(tmp_path, tensorboard=True, start_step=1) as logger:
        logger.log(2, {"loss": 20.0})
    assert len(glob.glob(str(tmp_path / "tensorboard" / "events.*"))) == 2  # same second, no clobbering
    assert _scalars_as_tensorboard_shows_them(tmp_path, "loss") == {1: 1.0, 2: 20.0}
    with _logger(tmp_path, tensorboard=True) as logger:  # a fresh run in the same directory
        logger.log(1, {"loss": 0.5})
    assert _scalars_as_tensorboard_shows_them(tmp_path, "loss") == {1: 0.5}


def test_progress_bar_and_warn_record_events(tmp_path, capsys):
    with _logger(tmp_path, progress=True, total_steps=4, start_step=1) as logger:
        logger.log(2, {"loss": 0.123456, "tokens_per_s": 1234567.0})
        assert logger._bar.n == 2
        assert logger._bar.postfix == "loss=0.1235, tokens_per_s=1.235e+06"
        logger.warn("loss is NaN at step 2")
    log = (tmp_path / "events.log").read_text().splitlines()
    assert len(log) == 1 and log[0].endswith("loss is NaN at step 2")
    assert "loss is NaN at step 2" in capsys.readouterr().out


def test_close_is_idempotent_and_log_after_close_is_refused(tmp_path):
    logger = _logger(tmp_path, tensorboard=True, progress=True)
    logger.close()
    logger.close()
    with pytest.raises(RuntimeError, match="after close"):
        logger.log(1, {"loss": 1.0})
