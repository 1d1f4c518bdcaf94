"""Save, resume and prune training checkpoints with Orbax, on one host or a whole pod.

A checkpoint is one step directory holding named items: pytrees of (sharded) arrays such as
`params` and `opt_state`, and JSON items such as `meta` and `config`:

    <directory>/<step>/{params,opt_state,meta,config,...}

Every process calls every method: Orbax writes each array shard from the process that owns
it, writes JSON items from the primary process only, and keeps the processes in step with
barriers. Saves are atomic: Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it to
`<step>` only when every item and every process is done, so a process killed mid-save
(preemption, SIGKILL) leaves at most a tmp directory, never a step that looks complete. Such
stale tmp directories are ignored when listing steps and deleted by the primary process when
the next `Checkpointer` opens the directory (`cleanup_tmp_directories`); a later save of the
same step would also replace one.

Restores are resharding: the caller gives the target layout as `jax.ShapeDtypeStruct`s with
a `.sharding` (see `abstract_like`), which may use a different mesh than the one saved from.
They are checked first: each array's stored shape (from the metadata alone) against the
target's, a one-line CheckpointError naming the array and both shapes. A step whose files are
damaged is an `UnreadableCheckpoint` (a CheckpointError) naming the step; `restore_latest`
then moves it aside to `<step>.corrupt-<UTC time>` and falls back to the next older step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

from topd_jax.errors import CheckpointError  # re-exported: the one class, also raised for HF checkpoints

# A run's checkpoints live in <output_dir>/checkpoints (the trainer writes them, export reads them).
CHECKPOINT_DIR = "checkpoints"

PyTree = Any


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint step whose files are damaged or missing (a truncated array file, a deleted
    _METADATA); `Checkpointer.restore_latest` passes over such a step for an older one."""


def _first_line(err: BaseException) -> str:
    """The root cause's first line: Orbax wraps TensorStore's precise error ("OUT_OF_RANGE: Error
    reading ... byte range ... is not valid") in a generic one that prints the whole spec."""
    for _ in range(10):
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:400]


def leaf_name(key_path) -> str:
    """'layers/0/mlp/down_proj' for a pytree key path; nnx's `value` wrapper level is dropped so
    the target (nnx.State) and the stored metadata (plain dicts) name a leaf alike."""
    parts = []
    for entry in key_path:
        part = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        if str(part) not in ("value", "raw_value"):
            parts.append(str(part))
    return "/".join(parts)


def abstract_like(tree: PyTree, shardings: PyTree | jax.sharding.Sharding | None = None) -> PyTree:
    """The restore target for `tree`: its leaves as `jax.ShapeDtypeStruct`s with shardings.

    `shardings` is one `Sharding` for every leaf, a pytree of them matching `tree`, or None to
    keep each leaf's own `.sharding` (leaves without one, e.g. numpy arrays, get none and are
    restored onto the default device).
    """
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            tree,
        )
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class _ReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _without_read_only_notice():
    """Orbax logs a WARNING that a read-only manager's directory is read only: what was asked for,
    and a second line on every export's one-line success."""
    logger, notice = logging.getLogger("absl"), _ReadOnlyNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class Checkpointer:
    """The trainer's checkpoints in one directory: periodic and forced saves, keep-last-k, resume.

    Args:
      directory: where step directories live, a local path or a URL such as `gs://bucket/run`;
        created if missing.
      every: save interval in steps for `should_save`; 0 saves only when forced.
      keep: how many of the newest complete checkpoints to keep; older ones are deleted after
        each save completes.
      async_save: if True, `save` returns once the arrays are copied off the devices and the
        write finishes in a background thread; the next `save`, `wait` or `close` waits for it.
      read_only: only list and restore; never save, prune or clean up tmp directories (a reader
        such as export must not delete the tmp directory of a run that is saving right now).
    """

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int, async_save: bool = True,
                 read_only: bool = False):
        if every < 0:
            raise CheckpointError(f"checkpoint interval `every` must be >= 0, got {every}")
        if keep < 1:
            raise CheckpointError(f"checkpoints to `keep` must be >= 1, got {keep}")
        directory = os.fspath(directory)
        # Orbax needs absolute paths; URLs (gs://...) already are.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.every = every
        self.read_only = read_only
        self._pending_step: int | None = None  # the step an async save is still writing
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else max(every, 1),  # unused: we decide and force
            max_to_keep=None if read_only else keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        with _without_read_only_notice() if read_only else contextlib.nullcontext():
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    # --- listing -------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (a save still being written is excluded)."""
        steps = sorted(self._manager.all_steps())
        if self._pending_step is not None and self._manager.is_saving_in_progress():
            steps = [s for s in steps if s != self._pending_step]
        return steps

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """Whether `step` is a periodic checkpoint step: `every > 0 and step % every == 0`."""
        return self.every > 0 and step % self.every == 0

    # --- saving --------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        trees: Mapping[str, PyTree],
        json: Mapping[str, Any],
        *,
        force: bool = False,
        other: Mapping[str, ocp.args.CheckpointArgs] | None = None,
    ) -> bool:
        """Save the array pytrees `trees` and JSON-serialisable `json` items as checkpoint `step`,
        and `other` items given as their Orbax save args (a Grain iterator's state:
        `grain.checkpoint.CheckpointSave`, written before this returns; `restore_other` reads it).

        Saves when `force` or `should_save(step)`; a step already saved is never overwritten
        (e.g. a final forced save right after the periodic one). Returns whether a save started.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; cannot save step {step}")
        other = other or {}
        clash = (set(trees) & set(json)) | ((set(trees) | set(json)) & set(other))
        if clash:
            raise CheckpointError(f"item names used for two items: {sorted(clash)}")
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():  # complete or still being written
            return False
        items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
        items.update({name: ocp.args.JsonSave(value) for name, value in json.items()})
        items.update(other)
        self._pending_step = step
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def wait(self) -> None:
        """Block until any async save is complete on disk (and old checkpoints are pruned)."""
        self._manager.wait_until_finished()
        self._pending_step = None

    def close(self) -> None:
        """Wait for any async save, then release Orbax's threads and handles."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- restoring -----------------------------------------------------------------------------

    def restore(
        self,
        step: int | None,
        abstract_trees: Mapping[str, PyTree],
        json_names: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Restore the named trees onto the shardings of `abstract_trees` and the named JSON items.

        `abstract_trees` maps item names to pytrees of `jax.ShapeDtypeStruct` with `.sharding`
        (the target layout, which may differ from the one saved). Items not named are not read,
        e.g. restore only `params` for export. `step` None means the latest checkpoint. Waits for
        any async save first, so that step is readable and no pruning races the read.
        """
        self.wait()
        step = self._resolve(step)
        items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_trees.items()}
        items.update({name: ocp.args.JsonRestore() for name in json_names})
        if not items:
            raise CheckpointError("restore needs at least one tree or json item name")
        where = f"checkpoint step {step} in {self.directory}"
        for name in sorted(abstract_trees, key=lambda n: n != "params"):  # the params name the mismatch best
            self._check_shapes(step, name, abstract_trees[name])
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except KeyError as e:  # Orbax: 'Item "x" was not found in the checkpoint. Available ...'
            raise UnreadableCheckpoint(f"{where} is unreadable: {e.args[0]}") from None
        except Exception as e:  # noqa: BLE001 (TensorStore, JSON, OS errors: the files are damaged)
            raise UnreadableCheckpoint(f"{where} is unreadable: {_first_line(e)}") from e
        return {name: restored[name] for name in items}

    def restore_latest(
        self,
        abstract_trees: Mapping[str, PyTree],
        json_names: Sequence[str] = (),
        *,
        report: Callable[[str], None] = lambda message: None,
    ) -> tuple[int, dict[str, Any]]:
        """(step, items) of the newest checkpoint that restores, as `restore` does.

        A step that does not restore (a truncated or deleted file: `UnreadableCheckpoint`) is
        passed over for the next older one. Once an older step has restored, each passed-over
        step is reported in one line through `report` and, by a writable Checkpointer, moved
        aside to `<step>.corrupt-<UTC time>` (never deleted: nothing is lost, and the next save
        of that step is not refused). When no step restores, nothing is moved: a failure that
        hits every step is more likely this run's target than damage to all of its files. A
        checkpoint that is readable but does not fit (a shape mismatch) is a CheckpointError, as
        from `restore`: falling back would silently train something else.
        """
        passed: list[tuple[int, UnreadableCheckpoint]] = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, abstract_trees, json_names)
            except UnreadableCheckpoint as err:
                passed.append((step, err))
                continue
            for bad, err in passed:
                moved = "" if self.read_only else f"; moved it to {os.path.basename(self.move_aside(bad))}"
                report(f"{err}{moved}; resuming from step {step}")
            return step, restored
        if not passed:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        raise CheckpointError(f"no readable checkpoint in {self.directory} (steps "
                              f"{', '.join(str(s) for s, _ in passed)} unreadable; newest: {passed[0][1]})")

    def move_aside(self, step: int) -> str:
        """Rename step directory `step` to `<step>.corrupt-<UTC time>` (process 0; every process
        waits for it) and re-list the steps; returns the new path."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; cannot move step {step} aside")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = os.path.join(self.directory, f"{step}.corrupt-{stamp}")
        if jax.process_index() == 0:
            os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"topd_jax: checkpoint {step} moved aside")
        self._manager.reload()
        return target

    def stored_shapes(self, step: int, name: str) -> dict[str, tuple[int, ...]]:
        """{'path/to/leaf': shape} of array item `name` at `step`, from its metadata alone."""
        path = os.path.join(self.directory, str(step), name)
        try:
            metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
            leaves = jax.tree_util.tree_flatten_with_path(metadata.tree)[0]
        except Exception as e:  # noqa: BLE001 (a missing or damaged _METADATA)
            raise UnreadableCheckpoint(f"checkpoint step {step} in {self.directory} is unreadable: the metadata "
                                       f"of {name!r}: {_first_line(e)}") from e
        return {leaf_name(key): tuple(leaf.shape) for key, leaf in leaves if hasattr(leaf, "shape")}

    def _check_shapes(self, step: int, name: str, abstract_tree: PyTree) -> None:
        """One-line CheckpointError naming the first leaf whose stored shape differs from the
        target's (a model of another size), before Orbax reads any data."""
        stored = self.stored_shapes(step, name)
        for key, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]:
            path, shape = leaf_name(key), tuple(getattr(leaf, "shape", ()))
            where = f"checkpoint step {step} in {self.directory}: {name}/{path}"
            if path not in stored:
                raise CheckpointError(f"{where} is built by the config but not in the checkpoint (have "
                                      f"{len(stored)} arrays): another model or optimizer structure")
            if stored[path] != shape:
                raise CheckpointError(f"{where} has shape {stored[path]} but the config builds {shape}")

    def restore_other(self, step: int, args: Mapping[str, ocp.args.CheckpointArgs]) -> list[str]:
        """Restore those of the items `args` (name -> Orbax restore args, e.g. a Grain iterator's
        `grain.checkpoint.CheckpointRestore`, which restores in place) that checkpoint `step`
        holds; returns their names (a checkpoint written before an item existed holds none)."""
        self.wait()
        held = {name: a for name, a in args.items() if epath.Path(self.directory, str(step), name).exists()}
        if held:
            try:
                self._manager.restore(step, args=ocp.args.Composite(**held))
            except Exception as e:  # noqa: BLE001 (a damaged or missing state file, another process count)
                raise UnreadableCheckpoint(f"checkpoint step {step} in {self.directory} is unreadable: "
                                           f"{', '.join(held)}: {_first_line(e)}") from e
        return sorted(held)

    def restore_tree(self, step: int | None, name: str, abstract_tree: PyTree) -> PyTree:
        """Restore one array pytree item (e.g. only `params`, not `opt_state`)."""
        return self.restore(step, {name: abstract_tree})[name]

    def restore_json(self, step: int | None, name: str) -> Any:
        """Restore one JSON item (e.g. the config, without knowing any tree structure)."""
        return self.restore(step, {}, (name,))[name]

    def _resolve(self, step: int | None) -> int:
        """The checkpoint step to read: `step`, or the latest one; a clear error if absent."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (have {steps})")
        return step
