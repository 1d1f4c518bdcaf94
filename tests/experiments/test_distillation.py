"""A short real distillation at the miniature's default batch (protocol.BATCH prompts per step):
OPD lowers the sampled reverse KL and raises the student's agreement with the teacher, so a
return to the noisy regime (16 prompts per step could not learn) is caught."""

import dataclasses

import numpy as np
from scipy import stats

from topd_jax.experiments import models, protocol


def test_opd_at_the_default_batch_moves_the_student_toward_the_teacher(tmp_path):
    teacher_dir = models.cached_sft(dataclasses.replace(models.TEACHER_SFT, steps=60, batch_size=32), tmp_path, "t")
    student_dir = models.cached_sft(dataclasses.replace(models.STUDENT_SFT, steps=15, batch_size=32), tmp_path, "s")
    config = protocol.distil_config(student_dir, teacher_dir, method="opd", seed=0, steps=12,
                                    output_dir=str(tmp_path / "run"))
    assert config.rollout.prompts_per_step == protocol.BATCH >= 256
    run = protocol.distil(config, models.eval_problems(8), eval_every=12)
    kl = np.array([r["reverse_kl_sampled"] for r in run["metrics"]])
    agreement = np.array([r["teacher_agreement"] for r in run["metrics"]])
    assert len(kl) == 12 and run["metrics"][-1]["skipped"] == 0.0
    assert kl[-3:].mean() < 0.8 * kl[:3].mean(), kl
    # Agreement rises along the run: a least-squares slope over the 12 steps at least 3 standard
    # errors above 0 (its per-step noise, not a fixed margin, sets the bar).
    fit = stats.linregress(np.arange(len(agreement)), agreement)
    assert fit.slope > 3 * fit.stderr, (fit, agreement)
