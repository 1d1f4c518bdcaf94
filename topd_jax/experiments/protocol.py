"""The paper's experiment in miniature (version 3): distillation runs, the locator analysis, and
the screen -> sweep -> test protocol.

    teacher, student = models.TEACHER_SFT, models.STUDENT_SFT         (cached, `models`)
    locator_analysis(student, teacher)      every locator of LOCATORS against the fork labels
                                            (`experiments.locator_analysis`)
    screen:  SCREEN methods at DEFAULT_LEARNING_RATE, development seed, development problems
    sweep:   the carried methods x LEARNING_RATES on the development seed (each method's rate
             is the best dev `area`, chosen before any test seed runs)
    test:    the carried methods at their rates x test seeds, 1,024 held-out problems

The regime (v3): BATCH = 256 prompts per step, so a step's sampled reverse-KL gradient averages
~7,500 completion tokens; at 16 prompts (v2, ~480 tokens) plain OPD could not learn. Every run
evaluates greedy accuracy at step 0 and every EVAL_EVERY steps; a run is summarised by its
accuracy at each budget, its `area` (mean accuracy over the budget, `statistics.curve_area`)
and its final accuracy, per step, per second of wall-clock and per counted FLOP (`step_flops`).
Distillation runs the real `Trainer` on `data.source: synthetic` with the SFT'd models loaded
from Hugging Face checkpoints, so the miniature exercises exactly the code of a real run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from topd_jax import fileio
from topd_jax.data import synthetic
from topd_jax.experiments import models
from topd_jax.experiments.locator_analysis import candidate_table, located_rollouts, locator_analysis
from topd_jax.experiments.ordering import longest_first
from topd_jax.experiments.statistics import curve_area
from topd_jax.losses.locators import LOCATORS
from topd_jax.trainer.config import TrainConfig, load_config
from topd_jax.trainer.loop import Trainer

BATCH = 256  # prompts per step: the regime where OPD learns (16 could not: too few tokens per step)
STEPS = 100
EVAL_EVERY = 25  # evaluations at 0, 25, 50, 75, 100: the budgets
DISTIL = ("data.source=synthetic", f"data.prompt_length={synthetic.PROMPT_LENGTH}",
          f"rollout.prompts_per_step={BATCH}", f"rollout.max_new_tokens={models.MAX_COMPLETION}",
          f"rollout.eos_ids=[{synthetic.EOS_ID}]", "loss.window=8", "loss.max_candidates=4", "loss.num_reference=4",
          "checkpoint.resume=false", "optimizer.max_grad_norm=1.0", "checkpoint.every=0", "logging.progress=false",
          "logging.tensorboard=false",
          # The results (docs/results.md) were measured in lockstep: a rerun regenerates them.
          "rollout.mode=static")
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
DEFAULT_LEARNING_RATE = 1e-3

# Readings of guidance (`losses.guidance.GUIDANCE`) at the settings the protocol runs: name ->
# loss overrides. "window" is the paper's form as we reconstruct it (sampled teacher window,
# per-window mean, lambda = 1). The v3 forms keep their names; the v4 grid (fixed before the
# screen ran) names its point: l = lambda, g = gamma, a = alpha, m = relay's max_segments.
_RELAY = ("loss.guidance=relay", "loss.suppress_weight=1.0")
READINGS: dict[str, tuple[str, ...]] = {
    "window": (),
    "greedy": ("loss.guidance_options.window_tokens=greedy",),
    "topk_fkl": ("loss.guidance_options.step_loss=topk_fkl",),
    "token": ("loss.guidance_options.norm=token",),
    "rollout_token": ("loss.guidance_options.norm=rollout_token",),
    "lambda0.1": ("loss.traj_weight=0.1",),
    "return": ("loss.guidance=return",),
    "unsuppressed": ("loss.suppress_weight=1.0",),  # guidance alone, alpha = 1
    **{f"return-l{lam:g}-g{gamma:g}": ("loss.guidance=return", f"loss.traj_weight={lam}",
                                       f"loss.guidance_options.gamma={gamma}")
       for lam in (0.1, 0.3, 1.0) for gamma in (0.5, 0.9)},
    **{f"bounded-a{alpha:g}-l{lam:g}": ("loss.guidance=bounded_return", f"loss.traj_weight={lam}",
                                        f"loss.guidance_options.alpha={alpha}")
       for alpha in (0.5, 0.9) for lam in (0.3, 1.0)},
    **{f"bounded_every-a{alpha:g}": ("loss.guidance=bounded_return", "loss.guidance_options.at=every",
                                     f"loss.guidance_options.alpha={alpha}") for alpha in (0.5, 0.9)},
    **{f"clean-l{lam:g}": ("loss.guidance=clean_window", f"loss.traj_weight={lam}") for lam in (0.1, 0.3, 1.0)},
    **{f"relay-m{m}": (*_RELAY, f"loss.guidance_options.max_segments={m}") for m in (1, 2)},
    **{f"relay_loc-m{m}": (*_RELAY, "loss.guidance_options.trigger=locator",
                           f"loss.guidance_options.max_segments={m}") for m in (1, 2)},
    "relay_fkl": (*_RELAY, "loss.guidance_options.loss=fkl"),
    "relay_stop": (*_RELAY, "loss.guidance_options.stop=true"),
}
# Readings that never read the locator (relay's top-k trigger, a return at every token): their
# oracle bound is the locator-triggered / divergent-state form of the same reading.
LOCATOR_FREE = {"relay-m1": "relay_loc-m1", "relay-m2": "relay_loc-m2", "relay_fkl": "relay_loc-m2",
                "relay_stop": "relay_loc-m2", "bounded_every-a0.5": "bounded-a0.5-l1",
                "bounded_every-a0.9": "bounded-a0.9-l1"}
# The baselines every protocol carries: OPD, suppression alone, the paper's TOPD (ot locator,
# window guidance) and the window form at the best real locator of v3's analysis (ot_rollout,
# ROC AUC 0.83), fixed before v4 ran.
BASELINES = ("opd", "opd_suppress", "topd", "topd@ot_rollout")


def method_name(locator: str, guidance: str | None) -> str:
    """topd (the paper's: ot, window), topd/<reading>, topd@<locator>[/<reading>]; guidance None
    is opd_suppress (no guidance) at that locator. A reading that never reads the locator
    (`LOCATOR_FREE`) is named without one."""
    base = "opd_suppress" if guidance is None else "topd"
    at = "" if locator == "ot" or guidance in LOCATOR_FREE else f"@{locator}"
    form = "" if guidance in (None, "window") else f"/{guidance}"
    return f"{base}{at}{form}"


def _methods() -> dict[str, tuple[str, tuple[str, ...]]]:
    table = {"opd": ("opd", ())}
    for locator in LOCATORS:  # every locator of the one table, with every reading
        where = () if locator == "ot" else (f"loss.locator={locator}",)
        table[method_name(locator, None)] = ("opd_suppress", where)
        for form, overrides in READINGS.items():
            table.setdefault(method_name(locator, form), ("topd", (*where, *overrides)))
    return table


# method -> (preset, overrides), derived from LOCATORS x READINGS.
METHODS: dict[str, tuple[str, tuple[str, ...]]] = _methods()
# What the development seed screens at DEFAULT_LEARNING_RATE (v4, fixed before it ran): the
# baselines; every reading's grid at the best real locator (ot_rollout); each reading at one
# point with the paper's locator (ot); the locator-free readings once.
_GRID = ("return-l0.1-g0.5", "return-l0.1-g0.9", "return-l0.3-g0.5", "return-l0.3-g0.9", "return-l1-g0.5",
         "return-l1-g0.9", "bounded-a0.5-l0.3", "bounded-a0.5-l1", "bounded-a0.9-l0.3", "bounded-a0.9-l1",
         "clean-l0.1", "clean-l0.3", "clean-l1", "relay_loc-m1", "relay_loc-m2")
_PAPER_LOCATOR = ("return-l0.3-g0.9", "bounded-a0.5-l1", "clean-l1", "relay_loc-m2")
_FREE = ("bounded_every-a0.5", "bounded_every-a0.9", "relay-m1", "relay-m2", "relay_fkl", "relay_stop")
SCREEN = tuple(dict.fromkeys([*BASELINES, *(method_name("ot_rollout", r) for r in _GRID),
                              *(method_name("ot", r) for r in _PAPER_LOCATOR),
                              *(method_name("ot", r) for r in _FREE)]))


def oracle_bound(method: str) -> str | None:
    """The same reading with the oracle locator (its bound; a locator-free reading's bound is its
    locator form, `LOCATOR_FREE`), or None for OPD."""
    if method == "opd":
        return None
    base, _, form = method.partition("/")
    form = LOCATOR_FREE.get(form, form)
    return method_name("oracle", form or ("window" if base.startswith("topd") else None))


def distil_config(student_dir: str, teacher_dir: str, *, method: str, seed: int, output_dir: str,
                  steps: int = STEPS, learning_rate: float = DEFAULT_LEARNING_RATE, batch: int = BATCH,
                  overrides: Sequence[str] = ()) -> TrainConfig:
    """The trainer config of one distillation run of the miniature (overrides go last)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    preset, extra = METHODS[method]
    return load_config(None, [f"output_dir={output_dir}", f"steps={steps}", f"preset={preset}", f"seed={seed}",
                              f"student.path={student_dir}", f"teacher.path={teacher_dir}", *DISTIL,
                              f"rollout.prompts_per_step={batch}", f"optimizer.learning_rate={learning_rate}",
                              *extra, *overrides])


def step_flops(config: TrainConfig, student_params: int, teacher_params: int, rollout_tokens: float) -> float:
    """Counted FLOPs of one training step: 2 N per token a model reads without a gradient, 6 N per
    token of the update (forward and backward), N its parameter count; attention (short here) and
    the OT solve are left out. With B rollouts of P prompt + `rollout_tokens` (mean) completion
    tokens, M candidates, R references and K window tokens:

        sample 2 N_s B (P + n);  score 2 N_T B (P + n);
        branch (teacher) 2 N_T B P_T K, P_T = M + R (branching locator) or M (guidance only),
               + 2 N_T B M K for a separate greedy guidance window;
        branch (student) 2 N_s B (M + R) K when the locator decodes a student window;
        relay, per round (max_segments rounds; 1 with stop): the student's scoring 2 N_s B (P + n),
               the locator's branches when it triggers (as above), and unless stop the teacher's
               segment 2 N_T B L, the student's continuation 2 N_s B n (counted at the whole
               completion: an upper bound) and the teacher's rescoring 2 N_T B (P + n);
        update 6 N_s B (P + n [+ M K with window guidance, + S L with relay's fkl segments])

    Windows are counted at their full K (the decode runs K steps unless every branch ended)."""
    loss, rollout = config.loss, config.rollout
    b = rollout.prompts_per_step * rollout.num_samples
    seq = config.data.prompt_length + rollout_tokens
    flops = 2 * student_params * b * seq + 2 * teacher_params * b * seq
    k, m, r = loss.window, loss.max_candidates, loss.num_reference
    locator = LOCATORS[loss.locator]
    locator_branches = 0.0
    if locator.branches:
        locator_branches = 2 * teacher_params * b * (m + r) * k
        if locator.student_window != "rollout":
            locator_branches += 2 * student_params * b * (m + r) * k
    if loss.uses_windows:
        flops += locator_branches
        if loss.guides_windows and not locator.branches:
            flops += 2 * teacher_params * b * m * k
        if loss.greedy_windows:
            flops += 2 * teacher_params * b * m * k
    packed = m * k if loss.uses_candidates and loss.guides_windows else 0
    if loss.splices:
        stop = loss.option("stop")
        rounds = 1 if stop else loss.option("max_segments")
        segment = loss.option("segment")
        per_round = 2 * student_params * b * seq
        if loss.option("trigger") == "locator":
            per_round += locator_branches
        if not stop:
            per_round += 2 * teacher_params * b * segment + 2 * student_params * b * rollout_tokens
            per_round += 2 * teacher_params * b * seq
        flops += rounds * per_round
        if loss.option("loss") == "fkl" and not stop:
            packed = rounds * segment
    flops += 6 * student_params * b * (seq + packed)
    return float(flops)


def _count(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def distil(config: TrainConfig, problems: Sequence[synthetic.Problem], *, eval_every: int = EVAL_EVERY,
           on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the trainer; evaluate greedy accuracy at step 0 and every `eval_every` steps.

    Returns {"accuracy": [(step, acc), ...], "metrics": [per-step metrics rows], "step_time":
    median seconds per step (after the first, compiling, step), "step_flops": counted FLOPs per
    step (`step_flops`), "final": the last evaluation's accuracy, "area": `curve_area`,
    "correct": per problem, the last evaluation's correctness (float [n], for paired comparisons),
    "stopped_at": the step the run reached (< config.steps when a SIGTERM stopped it)}.
    """
    curve, rows, correct = [], [], []

    def evaluate(trainer, step):
        c = models.correctness(nnx.merge(trainer.graphdef, trainer.state.params), problems)
        curve.append((step, float(np.mean(c))))
        correct.append(c)

    def callback(trainer, step, metrics):
        rows.append({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in metrics.items()})
        if step % eval_every == 0 or step == config.steps:
            evaluate(trainer, step)
        if on_step is not None:
            on_step(step)

    trainer = Trainer(config, callbacks=[callback])
    try:
        evaluate(trainer, trainer.step)
        teacher_params = _count(trainer.teacher_params)
        trainer.run()
        if curve[-1][0] != trainer.step:  # stopped early (SIGTERM): the accuracy where it stopped
            evaluate(trainer, trainer.step)
    finally:
        trainer.close()  # releases output_dir's run lock even when the run raised
    times = [float(r["time_step"]) for r in (rows[1:] or rows)] or [float("nan")]  # the first step compiles
    lengths = [float(r["rollout_length_mean"]) for r in rows if "rollout_length_mean" in r] or [0.0]
    flops = step_flops(config, _count(trainer.state.params), teacher_params, float(np.mean(lengths)))
    return {"accuracy": curve, "metrics": rows, "step_time": float(np.median(times)), "step_flops": flops,
            "final": curve[-1][1], "area": curve_area(curve), "correct": np.asarray(correct[-1], np.float64),
            "stopped_at": curve[0][0] + len(rows)}


# ---------------------------------------------------------------------------- the protocol

def run_record(method: str, seed: int, learning_rate: float, run: dict[str, Any]) -> dict[str, Any]:
    """What results.json keeps of one `distil` run (per problem correctness only as the test
    runs' paired material)."""
    rows = run["metrics"]

    def mean(key):
        values = [float(r[key]) for r in rows if key in r]
        return float(np.mean(values)) if values else None

    def at(key, where):  # the metric's mean over the first (where=0) or last 10 steps
        values = [float(r[key]) for r in rows if key in r]
        part = values[:10] if where == 0 else values[-10:]
        return float(np.mean(part)) if part else None

    return {"method": method, "seed": seed, "learning_rate": learning_rate, "accuracy": run["accuracy"],
            "final": run["final"], "area": run["area"], "step_time": run["step_time"],
            "step_flops": run["step_flops"], "stopped_at": run["stopped_at"],
            "skipped_steps": float(sum(float(r.get("skipped", 0.0)) for r in rows)),
            "low_divergence_share": mean("low_divergence_share"),
            "loss_traj": [at("loss_traj", 0), at("loss_traj", 1)],
            "reverse_kl_sampled": [at("reverse_kl_sampled", 0), at("reverse_kl_sampled", 1)],
            "teacher_agreement": [at("teacher_agreement", 0), at("teacher_agreement", 1)],
            "grad_norm": mean("grad_norm")}


def choose_carried(screen: dict[str, dict[str, Any]], carry: int) -> list[str]:
    """The methods the test seeds run, from the development screen only:

        BASELINES + the `carry` best other screened methods by dev area (oracle-locator methods
        excluded: they are bounds) + the oracle bound of each of those `carry` methods.
    """
    others = [m for m in screen if m not in BASELINES and "@oracle" not in m]
    best = sorted(others, key=lambda m: -screen[m]["area"])[:carry]
    bounds = [oracle_bound(m) for m in best]
    return list(dict.fromkeys([m for m in BASELINES if m in screen] + best + [b for b in bounds if b in METHODS]))


def _distil_task(protocol: "Protocol", student_dir: str, teacher_dir: str, out_dir: str,
                 task: tuple[str, int, float, str]) -> dict[str, Any]:
    """One run of the protocol: task = (method, seed, learning rate, "dev" | "test")."""
    method, seed, lr, split = task
    problems = (models.eval_problems(protocol.dev_problems, models.DEV_EVAL_SEED) if split == "dev"
                else models.eval_problems(protocol.eval_problems))
    config = distil_config(student_dir, teacher_dir, method=method, seed=seed, steps=protocol.steps,
                           learning_rate=lr, batch=protocol.batch,
                           output_dir=os.path.join(out_dir, "runs", split, f"{method.replace('/', '+')}-{seed}-{lr:g}"))
    run = distil(config, problems, eval_every=protocol.eval_every)
    return run


def use_compile_cache(path: str) -> None:
    """Keep every compiled program in JAX's persistent cache at `path` (unless a cache directory is
    already set, e.g. by JAX_COMPILATION_CACHE_DIR), however small or fast to compile: the
    protocol's runs compile the same programs again and again (a run's update is built per
    Trainer; JAX's default caches only programs that took over a second), which cost 10-20 s of
    each ~60 s run (benchmarks/profile_miniature.py)."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class _Jobs:
    """Runs protocol tasks in this process (workers = 1) or in `workers` spawned processes, and
    yields (task, run) as each ends. The processes are started once and serve every stage (screen,
    sweep, test: no start-up, import or program load per stage); each keeps its compiled programs
    in the persistent cache at `compile_cache` (`use_compile_cache`). `close` stops them."""

    def __init__(self, protocol, student_dir, teacher_dir, out_dir, workers: int, compile_cache: str):
        self.call = functools.partial(_distil_task, protocol, student_dir, teacher_dir, out_dir)
        self.workers = workers
        self.compile_cache = compile_cache
        self.pool = None
        use_compile_cache(compile_cache)

    def map(self, tasks):
        if self.workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                yield task, self.call(task)
            return
        import concurrent.futures
        import multiprocessing

        if self.pool is None:
            context = multiprocessing.get_context("spawn")  # never fork a process that holds a JAX runtime
            self.pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context,
                                                               initializer=use_compile_cache,
                                                               initargs=(jax.config.jax_compilation_cache_dir,))
        futures = {self.pool.submit(self.call, task): task for task in tasks}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything that decides the protocol's numbers (results.json records it; a results.json of
    another protocol in the same folder is refused, one of the same protocol is resumed)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    dev_seed: int = models.DEV_SEED
    screen: tuple[str, ...] = SCREEN
    carry: int = 2
    learning_rates: tuple[float, ...] = LEARNING_RATES
    steps: int = STEPS
    eval_every: int = EVAL_EVERY
    batch: int = BATCH
    eval_problems: int = 1024
    dev_problems: int = 512
    locator_batches: int = 8

    def __post_init__(self):
        if self.dev_seed in self.seeds:
            raise ValueError(f"the development seed {self.dev_seed} must not be a test seed {list(self.seeds)}")
        unknown = [m for m in self.screen if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if DEFAULT_LEARNING_RATE not in self.learning_rates:
            raise ValueError(f"the learning rates {list(self.learning_rates)} must include the screen's "
                             f"{DEFAULT_LEARNING_RATE:g}")


def reproduce(out_dir: str, protocol: Protocol = Protocol(), *, cache_dir: str | None = None, workers: int = 1,
              progress: Callable[[str], None] | None = None, teacher_sft: models.SftConfig = models.TEACHER_SFT,
              student_sft: models.SftConfig = models.STUDENT_SFT) -> dict[str, Any]:
    """The protocol, in order; writes out_dir/results.json after every run ("complete": false until
    the end) and resumes from it (runs already recorded are not repeated).

    1. SFT teacher and student (cached); their greedy accuracy and malformed share on the test
       problems; `locator_analysis` of the SFT'd pair (skipped with locator_batches = 0).
    2. Screen: every method of protocol.screen at DEFAULT_LEARNING_RATE, dev seed, dev problems.
    3. Carry (`choose_carried`, from the screen alone) and sweep: each carried method at every
       other rate on the dev seed; its rate is the best dev area (ties: the lower rate).
    4. Test: every carried method at its rate for every test seed, on the held-out problems.

    workers > 1 runs that many distillations at once, each in its own process (`_Jobs`); every
    run is a pure function of its (method, seed, rate), so the numbers do not depend on it.
    """
    say = progress or (lambda text: None)
    path = os.path.join(out_dir, "results.json")
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(protocol).items()}
    cache_dir = cache_dir or os.path.join(out_dir, "models")
    teacher_dir = models.cached_sft(teacher_sft, cache_dir, "teacher")
    student_dir = models.cached_sft(student_sft, cache_dir, "student")
    results: dict[str, Any] | None = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        if results.get("protocol") != settings or results.get("task_version") != synthetic.VERSION:
            raise ValueError(f"{path} holds the results of another protocol; use another --out to keep both")
        say(f"resuming {path}")
    if results is None:
        teacher, student = models.load(teacher_dir), models.load(student_dir)
        problems = models.eval_problems(protocol.eval_problems)
        results = {"task_version": synthetic.VERSION, "protocol": settings, "complete": False,
                   "teacher_accuracy": models.accuracy(teacher, problems),
                   "student_accuracy": models.accuracy(student, problems),
                   "teacher_malformed": models.malformed(teacher, problems),
                   "student_malformed": models.malformed(student, problems),
                   "screen": {}, "sweep": {}, "carried": None, "chosen_learning_rate": {}, "runs": {}}
        if protocol.locator_batches:
            loss = distil_config(student_dir, teacher_dir, method="topd", seed=0, output_dir=out_dir).loss
            results["locators"] = locator_analysis(student, teacher, loss=loss, batches=protocol.locator_batches,
                                                   batch_size=32)
            say(f"locator analysis: {results['locators']['cosmetic_share']:.1%} of candidates are surface forms")

    def save():
        fileio.write_file(path, json.dumps(results, indent=1))

    save()

    jobs = _Jobs(protocol, student_dir, teacher_dir, out_dir, workers, os.path.join(cache_dir, "jax"))

    def each(tasks, record):  # run tasks (method, seed, lr, split) and record each as it ends
        for task, run_ in jobs.map(longest_first(tasks, results["screen"])):
            record(task, run_)
            save()

    try:
        stages(each, results, save, protocol, say)
    finally:
        jobs.close()
    return results


def stages(each, results, save, protocol, say) -> None:
    """The screen, the carry, the sweep and the test seeds (`reproduce`), each stage resumed from
    what results.json holds."""

    def screened(task, run_):
        method, seed, lr, _ = task
        results["screen"][method] = run_record(method, seed, lr, run_)
        say(f"screen {method}: area {run_['area']:.3f}, final {run_['final']:.3f}")

    each([(m, protocol.dev_seed, DEFAULT_LEARNING_RATE, "dev") for m in protocol.screen
          if m not in results["screen"]], screened)  # 2. the screen (dev seed, the default rate)
    if results["carried"] is None:
        results["carried"] = choose_carried(results["screen"], protocol.carry)
        save()
    for method in results["carried"]:  # the screen's run is the sweep's default-rate cell
        screened_run = results["screen"].get(method)
        results["sweep"].setdefault(method, {} if screened_run is None else
                                    {f"{DEFAULT_LEARNING_RATE:g}": screened_run})

    def swept(task, run_):
        method, seed, lr, _ = task
        results["sweep"][method][f"{lr:g}"] = run_record(method, seed, lr, run_)
        say(f"sweep {method} lr {lr:g}: area {run_['area']:.3f}")

    each([(m, protocol.dev_seed, lr, "dev") for m in results["carried"] for lr in protocol.learning_rates
          if f"{lr:g}" not in results["sweep"][m]], swept)  # 3. the sweep of the carried methods
    for method in results["carried"]:
        sweep = results["sweep"][method]
        results["chosen_learning_rate"][method] = float(
            max(protocol.learning_rates, key=lambda lr: (sweep[f"{lr:g}"]["area"], -lr)))
    save()

    def tested(task, run_):
        method, seed, lr, _ = task
        results["runs"][f"{method}|{seed}"] = {**run_record(method, seed, lr, run_), "correct": run_["correct"].tolist()}
        say(f"test {method} seed {seed}: area {run_['area']:.3f}, final {run_['final']:.3f}")

    each([(m, seed, results["chosen_learning_rate"][m], "test") for m in results["carried"] for seed in protocol.seeds
          if f"{m}|{seed}" not in results["runs"]], tested)  # 4. the test seeds
    results["complete"] = True
    save()


__all__ = ["BASELINES", "BATCH", "DEFAULT_LEARNING_RATE", "DISTIL", "EVAL_EVERY", "LEARNING_RATES", "LOCATOR_FREE",
           "READINGS",
           "METHODS", "Protocol", "SCREEN", "STEPS", "candidate_table", "choose_carried", "distil", "distil_config",
           "located_rollouts", "locator_analysis", "method_name", "oracle_bound", "reproduce", "run_record",
           "step_flops"]
