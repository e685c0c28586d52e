"""The partial-annotation batch sampler (docs/method.md, "Training").

Each optimizer step trains one task, in round-robin order over the tasks; every
micro-batch of the step (gradient accumulation) shares that task. Each
micro-batch comes from one dataset, drawn among the datasets annotated for the
task with the release's probabilities. Within a (task, dataset) stream the
samples are a seeded permutation, reshuffled each time the stream is exhausted;
each micro-batch carries its stream's epoch, so the sources draw a new
augmentation of an image every epoch (``source[(index, epoch)]``).

Every random decision is a pure function of (seed, counter), so the sampler's
whole state is a few counters: ``state_dict()`` / ``load_state_dict()`` restore
it mid-epoch and the continuation is identical. With several processes
(``num_replicas``), all ranks draw the same task and dataset for a micro-batch
and take disjoint slices of the same global batch.

``micro_batch_loader`` reads the same sequence with ``DataLoader`` worker processes: its batch
sampler replays a copy of the sampler from its current state, and the trainer advances its own
sampler only as it consumes micro-batches, so a checkpoint saves the state after what was trained
on, never what the workers prefetched.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass

import numpy as np

from stablemtl.guard import die_with_parent
from stablemtl.presets import DEFAULT_SEED
from stablemtl.tasks import TASK_NAMES, get_task

# task -> {dataset: probability}, the release's training mix
TASK_DATASET_PROBS = {
    "albedo": {"hypersim": 1.0},
    "shading": {"hypersim": 1.0},
    "depth": {"hypersim": 0.9, "vkitti": 0.1},
    "normal": {"hypersim": 0.9, "vkitti": 0.1},
    "semantic": {"vkitti": 1.0},
    "optical_flow": {"vkitti": 0.5, "flying_things_3d": 0.5},
    "scene_flow": {"vkitti": 0.5, "flying_things_3d": 0.5},
}


@dataclass(frozen=True)
class MicroBatch:
    step: int  # optimizer step
    micro: int  # micro-batch within the step (0 .. accumulation - 1)
    task: str
    dataset: str
    indices: tuple[int, ...]  # this rank's indices into the (task, dataset) source
    epoch: int = 0  # the stream's epoch these indices come from (the augmentation's draw)


class TaskMixingSampler:
    """Round-robin tasks per optimizer step, a dataset per micro-batch, seeded and resumable.

    ``stream_sizes`` maps (task, dataset) to the number of samples of that source.
    Iterating yields ``MicroBatch`` objects forever (or ``num_steps`` steps).
    """

    def __init__(self, stream_sizes: dict, tasks=None, batch_size: int = 1, accumulation: int = 1,
                 probabilities: dict | None = None, seed: int = DEFAULT_SEED, num_replicas: int = 1, rank: int = 0,
                 num_steps: int | None = None):
        probabilities = TASK_DATASET_PROBS if probabilities is None else probabilities
        tasks = list(TASK_NAMES if tasks is None else tasks)
        tasks = [t for t in TASK_NAMES if t in tasks] + [t for t in tasks if t not in TASK_NAMES]
        self.choices = {}
        for task in tasks:
            get_task(task)  # an unknown name: a ValueError listing the valid ones
            if task not in probabilities:
                raise ValueError(f"no dataset probabilities for task {task!r}")
            avail = {d: p for d, p in probabilities[task].items() if stream_sizes.get((task, d), 0) > 0}
            if not avail:
                raise ValueError(f"task {task!r}: none of its datasets {list(probabilities[task])} has samples "
                                 f"(streams given: {sorted(stream_sizes)})")
            total = sum(avail.values())
            self.choices[task] = (list(avail), np.array([p / total for p in avail.values()]))
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        for (task, dataset), n in stream_sizes.items():
            if task in self.choices and dataset in self.choices[task][0] and n < batch_size * num_replicas:
                raise ValueError(f"stream ({task}, {dataset}) has {n} samples, fewer than one global batch "
                                 f"({batch_size} x {num_replicas} processes)")
        self.tasks = tasks
        self.stream_sizes = dict(stream_sizes)
        self.batch_size, self.accumulation = int(batch_size), int(accumulation)
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.num_steps = num_steps
        self.position = 0  # micro-batches drawn so far
        self.cursors = {key: [0, 0] for key in stream_sizes}  # stream -> [epoch, offset]

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"position": self.position, "cursors": {f"{t}/{d}": list(c) for (t, d), c in self.cursors.items()},
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.position = int(state["position"])
        for key, cursor in state["cursors"].items():
            task, dataset = key.split("/", 1)
            if (task, dataset) in self.cursors:
                self.cursors[(task, dataset)] = [int(cursor[0]), int(cursor[1])]

    # ----------------------------------------------------------------- drawing
    def task_of_step(self, step: int) -> str:
        return self.tasks[step % len(self.tasks)]

    def _permutation(self, key, epoch: int) -> np.ndarray:
        stream = sorted(self.stream_sizes).index(key)
        return np.random.default_rng([self.seed, 1, stream, epoch]).permutation(self.stream_sizes[key])

    def _take(self, key, count: int) -> tuple[list[int], int]:
        epoch, offset = self.cursors[key]
        n = self.stream_sizes[key]
        if offset + count > n:  # drop the incomplete tail, as drop_last; reshuffle
            epoch, offset = epoch + 1, 0
        out = self._permutation(key, epoch)[offset:offset + count].tolist()
        self.cursors[key] = [epoch, offset + count]
        return out, epoch

    def next(self) -> MicroBatch:
        step, micro = divmod(self.position, self.accumulation)
        task = self.task_of_step(step)
        datasets, probs = self.choices[task]
        u = np.random.default_rng([self.seed, 0, self.position]).random()
        dataset = datasets[min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(datasets) - 1)]
        global_batch, epoch = self._take((task, dataset), self.batch_size * self.num_replicas)
        mine = global_batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.position += 1
        return MicroBatch(step, micro, task, dataset, tuple(mine), epoch)

    def __iter__(self):
        while self.num_steps is None or self.position < self.num_steps * self.accumulation:
            yield self.next()


# ----------------------------------------------------------------- worker processes
class MicroBatchDataset:
    """A map-style dataset over the sources, keyed by ``(MicroBatch, index)``: the sample
    ``sources[(task, dataset)][(index, epoch)]``, its augmentation a pure function of (seed, epoch, index).
    Returns ``(micro_batch, sample)`` so that the collate knows the micro-batch it builds."""

    def __init__(self, sources: dict):
        self.sources = sources

    def __getitem__(self, key):
        mb, index = key
        return mb, self.sources[(mb.task, mb.dataset)][(index, mb.epoch)]


class MicroBatchSampler:
    """The batch sampler of a ``DataLoader``: the micro-batches of a *copy* of ``sampler`` from its
    current state, up to ``limit`` micro-batches in all (its ``position``), each as the keys of
    ``MicroBatchDataset``. The copy runs ahead of the trainer (workers prefetch); the trainer's own
    sampler advances only as micro-batches are consumed."""

    def __init__(self, sampler: TaskMixingSampler, limit: int | None = None):
        self.sampler, self.limit = copy.deepcopy(sampler), limit

    def __iter__(self):
        s = self.sampler
        while self.limit is None or s.position < self.limit:
            mb = s.next()
            yield [(mb, i) for i in mb.indices]


class _CollateMicroBatch:
    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        mb = items[0][0]
        return mb, self.collate([sample for _, sample in items], mb.task)


def _seed_worker(worker_id: int, parent: int | None = None) -> None:
    """Each worker's RNGs from the loader's seeded generator (the sources draw no global randomness;
    this only makes any stray draw reproducible); the worker dies with ``parent`` (the trainer's process),
    so a SIGKILLed training leaves no orphans."""
    import random

    import torch

    die_with_parent(parent)

    seed = torch.utils.data.get_worker_info().seed  # base seed (from the loader's generator) + worker id
    random.seed(seed)
    np.random.seed(seed % 2**32)


def micro_batch_loader(sampler: TaskMixingSampler, sources: dict, collate, num_workers: int,
                       prefetch_factor: int = 2, limit: int | None = None, pin_memory: bool = False):
    """A ``DataLoader`` yielding ``(MicroBatch, collate(samples, task))`` in exactly the order of
    ``sampler.next()`` from its current state (``sampler`` itself is not advanced), read by
    ``num_workers`` processes with ``prefetch_factor`` micro-batches each in flight. Worker seeds come
    from a generator seeded by the sampler's seed and position, never from the global torch RNG."""
    import torch

    generator = torch.Generator().manual_seed(sampler.seed * 1_000_003 + sampler.position)
    return torch.utils.data.DataLoader(
        MicroBatchDataset(sources), batch_sampler=MicroBatchSampler(sampler, limit), num_workers=num_workers,
        collate_fn=_CollateMicroBatch(collate), pin_memory=pin_memory,
        worker_init_fn=functools.partial(_seed_worker, parent=os.getpid()),
        generator=generator, prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=False)
