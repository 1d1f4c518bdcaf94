"""rollout.mode = continuous: a step's rollouts from decode slots that outlive the step.

    pool = RolloutPool(rollout_config, next_prompts=fn, key=k)   # fn() -> (tokens, mask, batch index)
    rollout, stats = pool.collect(student, version=v, mesh=m)   # the first completed prompts' groups
    line = pool.drop(step)                                      # at a checkpoint: what was dropped, why

A group is one prompt's num_samples rows, inserted together (`slots.insert`) when enough slots are
free. Each `collect` at policy version v (the number of updates so far):
  1. groups whose rows were started at a version older than v - max_staleness are dropped, their
     rows still decoding evicted (`slots.evict`);
  2. free slots are filled with the next groups (prompts from `next_prompts`, a source batch at a
     time, in order), a padding bucket of rows per insert (`slots.bucket`);
  3. `slots.decode` runs until an eighth of the slots (whole groups, at least one) is free
     (checked every check_every steps);
     the ended rows are taken (`slots.take`, their tokens, behaviour log-probs and versions copied
     to the host) and their slots freed;
  2-3 repeat until prompts_per_step groups are complete. The step takes the first completed groups
  in completion order, samples of a prompt adjacent; rows still decoding and groups completed
  beyond the step's need carry into the next step. Every token keeps the behaviour log-prob b_t
  of the student version that drew it; the loss's ratio exp(s_t - b_t) (clipped by loss.clip_eps)
  corrects the tokens an older student wrote.
Group g is prompt i of source batch b, g = b * G + i (G prompts a batch); its row j draws from
fold_in(fold_in(key, g), j) (`sampling.row_keys`): a group's tokens depend on its prompt, g and
the weights only, never on the slot or the other rows.

The pool policy at a checkpoint is drop: the KV caches of rows in flight are not checkpointed, so
a resumed run starts with an empty pool, and the uninterrupted run drops its pool at every save as
well (the line `drop` returns says how much) so that both continue identically. A save every
`checkpoint.every` steps loses at most one pool's worth of rollouts per `every` steps.

Several processes (a pod) run the same bookkeeping on the same values: the prompts are every
process's rows gathered (`next_prompts` returns the global batch), and what is read back from the
slots (which rows ended, the taken rows, the counters) is all-gathered (`sharding.host_global`),
so every process makes the same choices and the step's Rollout is placed from identical host
values (`placement.put_global`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from topd_jax import slots as slots_lib
from topd_jax.models.sharding import host_global
from topd_jax.sampling import Rollout, row_keys
from topd_jax.trainer import placement
from topd_jax.trainer.config import RolloutConfig
from topd_jax.trainer.step import sampling_options

ROW_FIELDS = ("prompt_tokens", "prompt_mask", "tokens", "mask", "logprobs", "finished")


@dataclasses.dataclass
class _Group:
    """One prompt's rows: its prompt, the version its rows started at, its ended rows by sample j."""

    prompt: tuple[np.ndarray, np.ndarray]
    started: int
    rows: dict = dataclasses.field(default_factory=dict)  # j -> {field: np.ndarray, "versions": ...}


class RolloutPool:
    """The slots, the groups they hold, the queue of prompts not yet inserted (module docstring)."""

    def __init__(self, rollout: RolloutConfig, *, next_prompts: Callable[[], tuple], key: jax.Array):
        self.config = rollout
        self.options = sampling_options(rollout)
        self.num_slots = rollout.num_slots
        # Free slots before the decode loop returns to refill: an eighth of them, whole groups.
        self.refill = max(rollout.num_samples, self.num_slots // 8 // rollout.num_samples * rollout.num_samples)
        self.next_prompts = next_prompts
        self.key = np.asarray(host_global(key))  # a host value: used under the inference mesh
        self.state: slots_lib.Slots | None = None
        self.reset()

    def reset(self) -> None:
        self.holds = np.full((self.num_slots, 2), -1)  # slot -> (group, sample j); -1 = free
        self.groups: dict[int, _Group] = {}
        self.complete: list[int] = []  # completed groups, in completion order
        self.queue: list[tuple[np.ndarray, np.ndarray, int]] = []  # (tokens, mask, group) drawn, not inserted
        if self.state is not None:
            self.state = slots_lib.evict(self.state, np.arange(self.num_slots))

    # ---------------------------------------------------------------- the step's rollouts

    def collect(self, student, *, version: int, mesh) -> tuple[Rollout, dict]:
        """The step's Rollout [prompts_per_step * num_samples, ...] (no cache) on `mesh` and its
        statistics (module docstring); `student` is the CausalLM at policy version `version`."""
        self._top_up(1)
        if self.state is None:  # the prompts' width P is the source's
            def init():
                return slots_lib.init_slots(student, slots=self.num_slots, prompt_len=self.queue[0][0].shape[0],
                                            max_new_tokens=self.config.max_new_tokens)

            shardings = placement.phase_shardings(jax.eval_shape(init), mesh)
            self.state = jax.jit(init, out_shardings=shardings)()  # made in place, on every host
        busy0, steps0 = self._counters()
        dropped = self._drop_stale(version)
        need, ns = self.config.prompts_per_step, self.config.num_samples
        while len(self.complete) < need:
            self._fill(student, version)
            self.state = slots_lib.decode(student, self.state, version=version, min_free=self.refill,
                                          check_every=self.config.check_every, options=self.options)
            self._harvest()
        taken, self.complete = self.complete[:need], self.complete[need:]
        rows = []
        for g in taken:  # samples of a prompt adjacent, in sample order
            group = self.groups.pop(g)
            rows.extend(group.rows[j] for j in range(ns))
        versions = self.last_versions = np.stack([r["versions"] for r in rows])  # [B, N], -1 past a row's end
        rollout = Rollout(*(np.stack([r[f] for r in rows]) for f in ROW_FIELDS), None)
        busy, steps = (now - then for now, then in zip(self._counters(), (busy0, steps0)))
        valid = rollout.mask
        lag = np.where(valid, version - versions, 0)
        stats = {
            "slot_utilisation": busy / max(steps * self.num_slots, 1),
            "decode_steps": steps,
            "rollouts_carried": int((self.holds[:, 0] >= 0).sum() + sum(len(g.rows) for g in self.groups.values())),
            "rollouts_dropped": dropped,
            "off_policy_share": float((lag > 0).sum() / max(valid.sum(), 1)),
            "version_lag": float(lag.sum() / max(valid.sum(), 1)),
        }
        return jax.tree.map(placement.put_global, rollout, placement.phase_shardings(rollout, mesh)), stats

    def _counters(self) -> tuple[int, int]:
        """The slots' (busy slot-steps, loop steps) so far."""
        busy, steps = host_global((self.state.busy_steps, self.state.steps))
        return int(busy), int(steps)

    def _drop_stale(self, version: int) -> int:
        """Drop the groups started before version - max_staleness; returns the rows dropped."""
        stale = {g for g, group in self.groups.items() if group.started < version - self.config.max_staleness}
        if not stale:
            return 0
        evicted = np.flatnonzero(np.isin(self.holds[:, 0], list(stale)))
        if len(evicted):
            self.state = slots_lib.evict(self.state, evicted)
            self.holds[evicted] = -1
        self.complete = [g for g in self.complete if g not in stale]
        for g in stale:
            del self.groups[g]
        return len(stale) * self.config.num_samples

    def _fill(self, student, version: int) -> None:
        """Insert the next groups into the free slots (one insert of a padding bucket of rows)."""
        ns = self.config.num_samples
        free = np.flatnonzero(self.holds[:, 0] < 0)
        count = len(free) // ns
        if not count:
            return
        self._top_up(count)
        prompts, self.queue = self.queue[:count], self.queue[count:]
        groups = np.array([q[2] for q in prompts])
        keys = jax.vmap(lambda g: row_keys(jax.random.fold_in(self.key, g), ns))(groups)
        keys = keys.reshape(count * ns, *keys.shape[2:])
        size = slots_lib.bucket(count * ns, self.num_slots)
        pick = np.concatenate([np.repeat(np.arange(count), ns), np.zeros(size - count * ns, int)])
        where = free[: count * ns]
        tokens = np.stack([prompts[i][0] for i in pick])
        mask = np.stack([prompts[i][1] for i in pick])
        keys = keys[np.concatenate([np.arange(count * ns), np.zeros(size - count * ns, int)])]
        self.state = slots_lib.insert(student, self.state, slots_lib.padded(where, size, self.num_slots), tokens, mask,
                                      keys)
        for i, g in enumerate(groups):
            self.groups[int(g)] = _Group(prompts[i][:2], version)
            self.holds[where[i * ns:(i + 1) * ns]] = [(g, j) for j in range(ns)]

    def _top_up(self, count: int) -> None:
        """Draw source batches until `count` prompts are queued."""
        while len(self.queue) < count:
            tokens, mask, index = self.next_prompts()
            size = len(tokens)
            self.queue.extend((t, m, index * size + i) for i, (t, m) in enumerate(zip(np.asarray(tokens),
                                                                                   np.asarray(mask))))

    def _harvest(self) -> None:
        """Copy the ended rows to their groups and free their slots; note completed groups."""
        done = slots_lib.ended(self.state, self.holds[:, 0] >= 0)
        if not len(done):
            return
        rollout, versions = host_global(slots_lib.take(self.state, done, self.options.eos_ids))
        for i, slot in enumerate(done):
            g, j = (int(x) for x in self.holds[slot])
            row = {f: np.asarray(getattr(rollout, f)[i]) for f in ROW_FIELDS}
            row["versions"] = np.asarray(versions[i])
            group = self.groups[g]
            group.rows[j] = row
            if len(group.rows) == self.config.num_samples:
                self.complete.append(g)
        self.holds[done] = -1

    # ---------------------------------------------------------------- checkpoints

    def drop(self, step: int) -> str | None:
        """Empty the pool (the checkpoint policy, module docstring); the line saying what was
        dropped, or None when the pool was empty."""
        in_flight = int((self.holds[:, 0] >= 0).sum())
        ended = sum(len(g.rows) for g in self.groups.values())
        queued = len(self.queue)
        self.reset()
        if not in_flight + ended + queued:
            return None
        return (f"checkpoint at step {step}: dropped the rollout pool ({in_flight} rollouts decoding, {ended} ended, "
                f"{queued} prompts queued; their prompts are not trained on): a checkpoint holds no decode caches, "
                "so a resumed run starts with an empty pool, and this run does too")
