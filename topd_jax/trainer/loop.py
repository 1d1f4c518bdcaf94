"""The trainer: wires models, prompts, the step, checkpoints and metrics around `step.py`.

    trainer = Trainer(load_config("configs/tiny_cpu.yaml", ["steps=4"]))
    trainer.run()       # resumes from output_dir/checkpoints when there is a checkpoint

Per step s (0-based; the state after it is step s + 1):
    key_s = fold_in(key, s);  prompts = source.batch(data_position)
    sample -> score -> branch (locate: candidates, windows, OT) -> train (pjit update)
each phase timed (time_sample, time_score, time_branch, time_train), then metrics are logged and a
checkpoint is saved when due. Everything a step draws comes from (key, s) and the data position,
both in the checkpoint, so a resumed run continues exactly as an uninterrupted one.

SIGTERM (preemptible TPU VMs), SIGINT (Ctrl-C) or SIGHUP (the terminal closed) sets a flag that
every process checks after each step (agreed across hosts); the trainer then saves a complete
checkpoint and returns cleanly (`stopped_by` names the signal). A second signal exits at once.
No file write can block the main thread (metrics.py writes every file, TensorBoard's included,
in the calling thread), so a signal always takes effect after the step in progress.

The trainer holds output_dir's run lock (trainer/rundir.py) from construction to close(): a
second trainer on the same folder is refused, and no file the run did not write is overwritten.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from topd_jax.errors import CheckpointError, ConfigError, TrainingError, is_disk_full, one_line
from topd_jax.losses.locators import LOCATORS
from topd_jax.losses.topd import TopdConfig
from topd_jax.models.checkpoint import load_pretrained
from topd_jax.models.config import DTYPES
from topd_jax.models.decoder import CausalLM
from topd_jax.models.families import config_to_hf
from topd_jax.models.sharding import param_shardings
from topd_jax.models.tokenizer import has_tokenizer, load_tokenizer
from topd_jax.prompts import PROMPT_SOURCES
from topd_jax.trainer import phases, placement, rundir
from topd_jax.trainer.checkpointing import CHECKPOINT_DIR, Checkpointer
from topd_jax.trainer.config import ComputeConfig, ModelSpec, TrainConfig, resume_changes, save_config
from topd_jax.trainer.flops import PhaseTimer, compiled_flops, device_peak_flops, measure_matmul_peak, mfu
from topd_jax.trainer.inputs import check_inputs
from topd_jax.trainer.metrics import MetricsLogger
from topd_jax.trainer.preemption import PREEMPTION
from topd_jax.trainer.rollouts import RolloutPool
from topd_jax.trainer.rundir import RunLock
from topd_jax.trainer.runtime import inference_mesh, initialize_distributed, mesh_from_config
from topd_jax.trainer.step import TrainState, experience, init_state



def new_run_id() -> str:
    """A run's name: its UTC start time and 4 random hex digits, e.g. 20261207T135818Z-3f2a."""
    import secrets
    import time

    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(2)}"


def host_value(x: jax.Array) -> np.ndarray:
    """A replicated (possibly multi-host) array's value on this host."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def build_model(spec: ModelSpec, mesh: jax.sharding.Mesh, rules=None,
                compute: ComputeConfig = ComputeConfig()) -> tuple[CausalLM, str | None]:
    """The model of `spec` with its params on the mesh, and its tokenizer directory (or None).

    A checkpoint path streams its safetensors straight onto the shardings; a random model is
    initialised inside jit with sharded outputs (identical values on any mesh and every host).
    `compute` sets how it computes (attention backend, remat).
    """
    dtype = DTYPES[spec.dtype]
    if spec.path is not None:
        tokenizer = spec.path if has_tokenizer(spec.path) else None
        return load_pretrained(spec.path, dtype=dtype, mesh=mesh, rules=rules,
                               overrides=compute.overrides()), tokenizer
    cfg, seed = dataclasses.replace(spec.random.model_config(), **compute.overrides()), spec.random.init_seed
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    shardings = param_shardings(abstract_params, mesh, rules)
    params = jax.jit(lambda: nnx.state(CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(seed)), nnx.Param),
                     out_shardings=shardings)()
    return nnx.merge(graphdef, params), None




Callback = Callable[["Trainer", int, dict[str, Any]], None]


class Trainer:
    """Builds everything from a TrainConfig; `run()` trains to config.steps.

    callbacks: called after every step as callback(trainer, step, metrics), after the step's
    checkpoint save was started (evaluation hooks, custom logging, fault injection in tests).
    devices: the devices of the mesh (default: all of them, on every host).
    """

    def __init__(self, config: TrainConfig, *, callbacks: Sequence[Callback] = (),
                 devices: Sequence[jax.Device] | None = None):
        initialize_distributed(config.distributed)
        self.config = config
        self.callbacks = tuple(callbacks)
        self.loss: TopdConfig = config.loss
        self.mesh = mesh_from_config(config.mesh, devices)
        r = config.rollout
        self.rollouts_per_step = r.prompts_per_step * r.num_samples
        try:
            placement.batch_size_divides(self.rollouts_per_step, self.mesh)
        except ValueError as err:
            raise ConfigError(f"rollout.prompts_per_step: {err}") from None
        self.primary = jax.process_index() == 0
        self.stopped_by: str | None = None  # the signal that stopped run() early, if one did
        self.run_lock = self._lock_output_dir()
        try:
            self._build()
        except BaseException:
            self.run_lock.release(refused=True)  # a refused start leaves no folder it created
            raise
        self._update = None
        self.update_flops = None
        self._peak = None

    def _lock_output_dir(self) -> RunLock:
        """Take output_dir's run lock (process 0; the other hosts follow its outcome)."""
        lock, ok, error = None, True, None
        try:
            lock = RunLock.acquire(self.config.output_dir, primary=self.primary)
            if self.primary and not self.config.checkpoint.resume and self.config.checkpoint.earlier_run == "refuse":
                rundir.start_over(self.config.output_dir, move=False)  # one line, before any model loads
        except (ConfigError, OSError) as err:
            if lock is not None:
                lock.release(refused=True)
            lock, ok, error = None, False, err
        rundir.agree(ok, f"output_dir {self.config.output_dir}: process 0 could not take the run lock (see its "
                         "error)")
        if error is not None:
            raise error
        return lock

    def _build(self) -> None:
        config, r = self.config, self.config.rollout
        # one-line reports (tokenizers not compared, the resume), written to events.log by run()
        self.notices: list[str] = check_inputs(config)  # before any weight is read
        source = PROMPT_SOURCES[config.data.source]
        if LOCATORS[self.loss.locator].labels and source.labeller is None:
            raise ConfigError(f"loss.locator {self.loss.locator!r} reads fork labels, but data.source "
                              f"{config.data.source!r} has none (sources with labels: "
                              + ", ".join(n for n, s in PROMPT_SOURCES.items() if s.labeller) + ")")
        shapes = {}
        for role in ("student", "teacher"):
            spec = getattr(config, role)
            try:
                shapes[role] = phases.model_config(spec, compute=config.model)  # config.json only
            except (OSError, CheckpointError, ConfigError, ValueError) as err:
                raise ConfigError(f"{role}.path {spec.path}: {one_line(err)}") from err
        # The no-gradient phases' mesh: the teacher lives there, the student is resharded there per step.
        self.inference_mesh = inference_mesh(config.inference, self.mesh, shapes["student"], shapes["teacher"])
        try:
            placement.batch_size_divides(self.rollouts_per_step, self.inference_mesh)
        except ValueError as err:
            raise ConfigError(f"inference: {err} (inference mesh {dict(self.inference_mesh.shape)})") from None
        models = {}
        for role in ("student", "teacher"):
            spec = getattr(config, role)
            mesh = self.mesh if role == "student" else self.inference_mesh
            try:
                models[role] = build_model(spec, mesh, compute=config.model)
            except (OSError, CheckpointError, ConfigError) as err:  # missing, pickle-only, damaged, bad config.json
                raise ConfigError(f"{role}.path {spec.path}: {one_line(err)}") from err
        (self.student, tokenizer_dir), (self.teacher, _) = models["student"], models["teacher"]
        vocab_s = self.student.config.vocab_size
        self.tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        self.prompts = self._prompt_source()
        if self.prompts.tokenizer is not None:  # a source with its own vocabulary (synthetic)
            self.tokenizer = self.prompts.tokenizer
            if vocab_s < self.tokenizer.vocab_size:
                raise ConfigError(f"data.source {config.data.source!r} has {self.tokenizer.vocab_size} tokens; the "
                                  f"models' vocab_size {vocab_s} is smaller")
        eos = r.eos_ids
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = (int(self.tokenizer.eos_token_id),)
        outside = [i for i in eos if not 0 <= i < vocab_s]
        if outside:  # sampling would index past the vocabulary at the first step
            raise ConfigError(f"rollout.eos_ids: {outside} outside the models' vocabulary of {vocab_s} tokens "
                              f"[0, {vocab_s})")
        # The rollout options with the EOS resolved: the static options of sampling and branching.
        self.rollout_config = dataclasses.replace(r, eos_ids=tuple(eos))

        self.optimizer = config.optimizer.build(config.steps)
        self.graphdef, params = nnx.split(self.student, nnx.Param)
        self.teacher_graphdef, self.teacher_params = nnx.split(self.teacher, nnx.Param)
        # The teacher for scoring (a prefill) on the training mesh: a second copy, made once, when
        # the inference mesh is another (phases.PHASE_MESH).
        self.teacher_score_params = self.teacher_params if self.inference_mesh is self.mesh else jax.device_put(
            self.teacher_params, placement.tree_shardings(self.teacher_params, self.mesh))
        self.phase_meshes = {name: self.inference_mesh if where == "inference" else self.mesh
                             for name, where in phases.PHASE_MESH.items()}
        key = jax.random.PRNGKey(config.seed)
        init = functools.partial(init_state, optimizer=self.optimizer)
        state_shardings = placement.state_shardings(jax.eval_shape(init, params, key=key), self.mesh)
        self.state: TrainState = jax.jit(init, out_shardings=state_shardings)(params, key=key)
        self.inference_shardings = placement.tree_shardings(params, self.inference_mesh)
        self.data_position = 0
        self.pool = None
        if r.mode == "continuous":
            try:
                placement.batch_size_divides(r.num_slots, self.inference_mesh)
            except ValueError as err:
                raise ConfigError(f"rollout.slots: {err}") from None
            self.pool = RolloutPool(self.rollout_config, next_prompts=self._next_prompts,
                                    key=jax.random.split(self.state.key)[1])
        # Names this run in its checkpoints (and so in what export says it exported); a resume
        # takes the checkpoint's.
        self.run_id = new_run_id()
        if not config.checkpoint.resume:  # earlier_run=move (refuse was refused with the lock)
            moved, error = None, None
            try:
                moved = rundir.start_over(config.output_dir, move=True) if self.primary else None
            except OSError as err:
                error = err
            rundir.agree(error is None, f"output_dir {config.output_dir}: process 0 could not move the earlier run "
                                        "aside (see its error)")  # and every host waits for the move
            if error is not None:
                raise error
            if moved is not None:
                self.notices.append(f"checkpoint.resume=false, checkpoint.earlier_run=move: moved the earlier run "
                                    f"({', '.join(moved[1])}) to {moved[0]}")
        self.checkpointer = Checkpointer(os.path.join(config.output_dir, CHECKPOINT_DIR),
                                         every=config.checkpoint.every, keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
        self.resume_changes: list[str] = []
        if config.checkpoint.resume and self.checkpointer.latest_step() is not None:
            try:
                self.restore()
            except BaseException:
                self.checkpointer.close()  # a refused resume must not leave Orbax's threads behind
                raise

    # ------------------------------------------------------------------ data and checkpoints

    def _prompt_source(self):
        """The `data.source` entry of `prompts.PROMPT_SOURCES`, built from the config."""
        d = self.config.data
        source = PROMPT_SOURCES[d.source]
        if source.needs_tokenizer and self.tokenizer is None:
            raise ConfigError(f"data.source {d.source!r} needs a tokenizer: set student.path to a checkpoint "
                              "directory with tokenizer files")
        return source.from_config(d, batch_size=self.config.rollout.prompts_per_step, seed=self.config.seed,
                                  vocab_size=self.student.config.vocab_size, tokenizer=self.tokenizer,
                                  data_dir=os.path.join(self.config.output_dir, "data"),
                                  process_index=jax.process_index(), process_count=jax.process_count())

    def _next_prompts(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The pool's next global source batch (tokens, mask, its index); advances the position."""
        index = self.data_position
        tokens, mask = self.prompts.batch(index)
        if self.prompts.local and jax.process_count() > 1:
            tokens, mask = multihost_utils.process_allgather((np.asarray(tokens), np.asarray(mask)), tiled=True)
        self.data_position += 1
        return tokens, mask, index

    @property
    def step(self) -> int:
        return int(host_value(self.state.step))

    def save(self, *, force: bool = False) -> bool:
        """Start a checkpoint of the current state if due (or forced): params, optimizer state,
        step, key, data position, run id, the run's config and the student's HF config (for export)."""
        step = self.step
        if not force and not self.checkpointer.should_save(step):
            return False
        meta = {"step": step, "key": host_value(self.state.key).tolist(), "data_position": self.data_position,
                "run_id": self.run_id}
        return self.checkpointer.save(
            step, {"params": self.state.params, "opt_state": self.state.opt_state},
            {"meta": meta, "config": self.config.to_dict(),
             "model_config": config_to_hf(self.student.config, dtype=self.config.student.dtype)},
            force=force, other=self.prompts.checkpoint_items())  # a prompt stream's state (Grain), if any

    def _save(self, logger: MetricsLogger, *, force: bool) -> None:
        """`save`; a continuous pool is dropped at every save (`trainer.rollouts`), said in one line."""
        if self.save(force=force) and self.pool is not None and (line := self.pool.drop(self.step)):
            logger.warn(line)

    def restore(self, step: int | None = None) -> None:
        """Continue from checkpoint `step` (None: the newest readable one; unreadable newer steps
        are moved aside, see Checkpointer.restore_latest), onto this run's shardings.

        Refused with a one-line error when the checkpoint's arrays have other shapes than this
        config builds, or when keys that change the training differ from the checkpoint's config
        (config.resume_changes) unless checkpoint.resume_changed is set; accepted changes are
        listed in `notices` (events.log)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                {"params": self.state.params, "opt_state": self.state.opt_state})
        if step is None:
            step, restored = self.checkpointer.restore_latest(abstract, ["meta", "config"], report=self.notices.append)
        else:
            restored = self.checkpointer.restore(step, abstract, ["meta", "config"])
        changes = resume_changes(restored["config"], self.config)
        if changes and not self.config.checkpoint.resume_changed:
            raise ConfigError(f"{self.config.output_dir} holds a checkpoint (step {step}) of another config: "
                              f"{'; '.join(changes)}. Pass checkpoint.resume_changed=true to continue with the new "
                              "values, or another output_dir (or checkpoint.resume=false "
                              "checkpoint.earlier_run=move) to start over")
        if changes:
            self.resume_changes = changes
            self.notices.append(f"resuming step {step} with changed config (checkpoint.resume_changed=true): "
                                + "; ".join(changes))
        meta = restored["meta"]
        replicated = placement.replicated(self.mesh)
        self.state = TrainState(
            step=placement.put_global(np.asarray(meta["step"], np.int32), replicated),
            params=restored["params"], opt_state=restored["opt_state"],
            key=placement.put_global(np.asarray(meta["key"], np.uint32), replicated))
        self.data_position = int(meta["data_position"])
        self.run_id = meta.get("run_id") or self.run_id  # checkpoints from before run ids get this one
        self.prompts.resumed(self.data_position,
                             self.checkpointer.restore_other(step, self.prompts.checkpoint_items(restore=True)))

    # ------------------------------------------------------------------ one step

    def _compile_update(self, batch):
        jitted = placement.jit_update(self.state, batch, self.mesh, graphdef=self.graphdef, optimizer=self.optimizer,
                                      loss=self.loss, chunk_size=self.config.chunk_size)
        with jax.set_mesh(self.mesh):  # the model keeps its activations split along the batch
            compiled = jitted.lower(self.state, batch).compile()
        self.update_flops = compiled_flops(compiled)
        return compiled

    def peak_flops(self) -> float:
        """Per-device peak FLOP/s for the MFU estimate: config, known chip table, or measured."""
        if self._peak is None:
            self._peak = (self.config.logging.peak_flops or device_peak_flops(jax.devices()[0])
                          or measure_matmul_peak())
        return self._peak

    def inference_params(self) -> Any:
        """The student's parameters on the inference mesh, for the step's no-gradient phases.

        One `jax.device_put` of the training state's parameters to `inference_shardings` (a
        reshard across the same devices, outside jit: the state is not donated, the update still
        needs it, and one transfer per step is all the phases need); the state itself when both
        meshes are one.
        """
        if self.inference_mesh is self.mesh:
            return self.state.params
        return jax.device_put(self.state.params, self.inference_shardings)

    def train_step(self, timer: PhaseTimer) -> dict[str, Any]:
        """sample -> score -> branch -> train on the next prompt batch; returns host metrics."""
        step = self.step
        key = jax.random.fold_in(self.state.key, step)
        k_sample, k_locate = placement.place(tuple(jax.random.split(key)), placement.replicated(self.inference_mesh))
        params = self.inference_params()
        rollout, pool_stats = None, {}
        if self.pool is None:
            put = placement.put_local_batch if self.prompts.local else placement.put_batch
            prompt_tokens, prompt_mask = put(self.prompts.batch(self.data_position), self.inference_mesh)
            self.data_position += 1
        else:  # the rollouts come from the slots; the source is read as the slots free up
            prompt_tokens = prompt_mask = None
            with timer.phase("sample"), jax.set_mesh(self.phase_meshes["sample"]):
                rollout, pool_stats = self.pool.collect(nnx.merge(self.graphdef, params), version=step,
                                                        mesh=self.phase_meshes["sample"])

        def run(name, phase, *args, **static):
            with timer.phase(name), jax.set_mesh(self.phase_meshes[name]):  # decode loops pin carries to it
                return jax.block_until_ready(phase(*args, **static))

        def move(tree, name):
            return placement.place(tree, placement.phase_shardings(tree, self.phase_meshes[name]))

        rollout, scores, located = phases.no_gradient_phases(
            run, move, self.graphdef, params, self.teacher_graphdef, (self.teacher_score_params, self.teacher_params),
            prompt_tokens, prompt_mask, k_sample, k_locate, options=self.rollout_config, loss=self.loss,
            chunk_size=self.config.chunk_size, labeller=self.prompts.labeller, rollout=rollout)
        batch = experience(rollout, scores, located)
        del rollout, scores, located, params  # the caches are the largest buffers of the step
        batch = placement.place(batch, placement.experience_shardings(batch, self.mesh))
        if self._update is None:
            self._update = self._compile_update(batch)
        with timer.phase("train"):
            self.state, metrics = jax.block_until_ready(self._update(self.state, batch))
        host = {k: host_value(v) for k, v in metrics.items()}
        times = timer.split()
        tokens = float(host_value(jnp.sum(batch.rollout.mask)))
        host.update(times, **pool_stats, tokens=tokens, tokens_per_s=tokens / max(times["time_step"], 1e-9),
                    tokens_per_s_finished=tokens / max(times["time_sample"], 1e-9))
        if self.update_flops:  # XLA's count is per device (the partitioned program), as is the peak
            host["mfu"] = mfu(self.update_flops, times["time_train"], self.peak_flops(), 1)
        return host

    # ------------------------------------------------------------------ the loop

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train from the current step to config.steps (or to step `until`, saving a checkpoint
        there: a planned stop that a later run resumes); returns the last step's metrics.

        Raises a one-line TrainingError naming the last complete checkpoint when
        optimizer.max_consecutive_skips steps in a row were skipped (non-finite loss or
        gradients), or when writing fails (a full disk, a read-only output_dir)."""
        cfg = self.config
        start = self.step
        stop = cfg.steps if until is None else min(until, cfg.steps)
        try:
            return self._run(start, stop)
        except TrainingError:
            raise
        except Exception as err:  # noqa: BLE001 (only file-system failures are turned into one line)
            if isinstance(err, OSError):
                reason = one_line(err)
            elif is_disk_full(err):  # TensorStore reports ENOSPC as a ValueError with the spec
                reason = "No space left on device (the disk is full) while writing a checkpoint"
            else:
                raise
            raise TrainingError(f"{reason}; {self._last_checkpoint()}") from err

    def _last_checkpoint(self) -> str:
        """Where a failed run can resume from, for its one-line error."""
        try:
            self.checkpointer.wait()
        except Exception:  # noqa: BLE001 (the failed save itself; what is complete is what counts)
            pass
        latest = self.checkpointer.latest_step()
        if latest is None:
            return f"no complete checkpoint in {self.checkpointer.directory} yet"
        return (f"the last complete checkpoint is step {latest} in {self.checkpointer.directory}; the next run "
                "resumes from it")

    def _run(self, start: int, stop: int) -> dict[str, Any]:
        cfg = self.config
        if self.primary:
            os.makedirs(cfg.output_dir, exist_ok=True)
            path = os.path.join(cfg.output_dir, "config.yaml")
            if self.resume_changes and os.path.isfile(path):  # keep what the run trained with so far
                os.replace(path, os.path.join(cfg.output_dir, f"config.before-{start}.yaml"))
            save_config(cfg, path)
        shown = ("loss", "low_divergence_share", "tokens_per_s") + (("slot_utilisation",) if self.pool else ())
        logger = MetricsLogger(cfg.output_dir, total_steps=cfg.steps, start_step=start,
                               tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                               enabled=self.primary, progress_keys=shown)
        for notice in self.notices:
            logger.warn(notice)
        self.notices = []
        skipped = dict(self.prompts.skipped)
        if skipped:
            logger.warn(f"data: skipped {sum(skipped.values())} records of {cfg.data.path or cfg.data.source} ("
                        + ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items())) + ")")
        if start:
            logger.warn(f"resumed from step {start} of {cfg.output_dir}")
        metrics: dict[str, Any] = {}
        timer = PhaseTimer()
        limit, consecutive = cfg.optimizer.max_consecutive_skips, 0
        with logger, PREEMPTION as preemption:
            while self.step < stop:
                metrics = self.train_step(timer)
                step = self.step
                if metrics["skipped"]:
                    logger.warn(f"step {step}: non-finite loss or gradients; update skipped, params unchanged")
                consecutive = consecutive + 1 if metrics["skipped"] else 0
                logger.log(step, metrics)
                self._save(logger, force=step == stop)
                for callback in self.callbacks:
                    callback(self, step, metrics)
                if limit and consecutive >= limit:
                    self.checkpointer.wait()
                    raise TrainingError(
                        f"steps {step - consecutive + 1}-{step}: {consecutive} consecutive steps had a non-finite "
                        f"loss or gradients and were skipped (optimizer.max_consecutive_skips={limit}); the run "
                        f"is not training: lower optimizer.learning_rate or set optimizer.max_grad_norm; "
                        f"{self._last_checkpoint()}")
                if step < stop and preemption.agreed():  # after the last step the run just ends
                    self._save(logger, force=True)
                    self.checkpointer.wait()
                    self.stopped_by = preemption.signal or "a signal on another host"
                    logger.warn(f"{self.stopped_by}: saved a complete checkpoint at step {step} in "
                                f"{self.checkpointer.directory}; exiting (rerun the same command to resume)")
                    break
            self.checkpointer.wait()
        return metrics

    def close(self) -> None:
        try:
            self.checkpointer.close()
        finally:
            self.run_lock.release()


__all__ = ["Trainer", "build_model", "host_value"]
