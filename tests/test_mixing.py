"""The partial-annotation sampler: round-robin tasks, reference dataset frequencies, resumable."""

from collections import Counter

import pytest

from stablemtl.data.mixing import TASK_DATASET_PROBS, TaskMixingSampler
from stablemtl.tasks import TASK_NAMES

SIZES = {(t, d): 10 + 3 * i for i, (t, d) in enumerate((t, d) for t, p in TASK_DATASET_PROBS.items() for d in p)}


def test_tasks_round_robin_per_optimizer_step():
    s = TaskMixingSampler(SIZES, batch_size=2, accumulation=3)
    batches = [s.next() for _ in range(3 * 14)]
    for k, mb in enumerate(batches):
        assert mb.step == k // 3 and mb.micro == k % 3
        assert mb.task == TASK_NAMES[mb.step % 7]  # the reference's order
        assert len(mb.indices) == 2 and all(0 <= i < SIZES[(mb.task, mb.dataset)] for i in mb.indices)


def test_dataset_frequencies_follow_the_reference_probabilities():
    s = TaskMixingSampler(SIZES, tasks=["depth", "optical_flow"], batch_size=1)
    counts = Counter((mb.task, mb.dataset) for mb in (s.next() for _ in range(8000)))
    n = 4000
    assert counts[("depth", "hypersim")] / n == pytest.approx(0.9, abs=0.02)
    assert counts[("depth", "vkitti")] / n == pytest.approx(0.1, abs=0.02)
    assert counts[("optical_flow", "flying_things_3d")] / n == pytest.approx(0.5, abs=0.03)
    assert {d for t, d in counts if t == "depth"} == {"hypersim", "vkitti"}


def test_each_stream_is_a_permutation_per_epoch():
    sizes = {("semantic", "vkitti"): 12}
    s = TaskMixingSampler(sizes, tasks=["semantic"], batch_size=4)
    first = [i for _ in range(3) for i in s.next().indices]
    second = [i for _ in range(3) for i in s.next().indices]
    assert sorted(first) == list(range(12)) == sorted(second)
    assert first != second  # reshuffled


def test_state_restore_continues_identically():
    a = TaskMixingSampler(SIZES, batch_size=3, accumulation=2, seed=5)
    for _ in range(23):  # stop mid-step and mid-epoch
        a.next()
    state = a.state_dict()
    expected = [a.next() for _ in range(40)]
    b = TaskMixingSampler(SIZES, batch_size=3, accumulation=2, seed=5)
    b.load_state_dict(state)
    assert [b.next() for _ in range(40)] == expected
    with pytest.raises(ValueError, match="seed"):
        TaskMixingSampler(SIZES, seed=6).load_state_dict(state)


def test_ranks_share_task_and_dataset_with_disjoint_indices():
    ranks = [TaskMixingSampler(SIZES, batch_size=2, num_replicas=2, rank=r) for r in range(2)]
    for _ in range(50):
        a, b = (r.next() for r in ranks)
        assert (a.task, a.dataset, a.step) == (b.task, b.dataset, b.step)
        assert not set(a.indices) & set(b.indices)


def test_bad_configurations_fail_early():
    with pytest.raises(ValueError, match="unknown task"):
        TaskMixingSampler(SIZES, tasks=["segmentation"])
    with pytest.raises(ValueError, match="none of its datasets"):
        TaskMixingSampler({("depth", "hypersim"): 4}, tasks=["semantic"])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TaskMixingSampler({("semantic", "vkitti"): 3}, tasks=["semantic"], batch_size=2, num_replicas=2)


class _Source:
    """A stand-in source: the sample is a pure function of (index, epoch)."""

    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index, epoch = key
        return {"key": (self.name, index, epoch)}


def test_the_loader_replays_the_sampler_from_its_state_without_advancing_it():
    from stablemtl.data.mixing import micro_batch_loader

    sampler = TaskMixingSampler(SIZES, batch_size=2, accumulation=3, seed=7)
    for _ in range(5):
        sampler.next()
    reference = TaskMixingSampler(SIZES, batch_size=2, accumulation=3, seed=7)
    reference.load_state_dict(sampler.state_dict())
    expected = [reference.next() for _ in range(40)]
    sources = {key: _Source(f"{key[0]}/{key[1]}", n) for key, n in SIZES.items()}
    collate = lambda samples, task: [s["key"] for s in samples]  # noqa: E731
    for workers in (0, 2):
        state = sampler.state_dict()
        got = list(micro_batch_loader(sampler, sources, collate, workers, limit=45))
        assert sampler.state_dict() == state  # the loader reads from a copy
        assert [mb for mb, _ in got] == expected
        assert all(keys == [(f"{mb.task}/{mb.dataset}", i, mb.epoch) for i in mb.indices] for mb, keys in got)
