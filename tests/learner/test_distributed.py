"""The data-parallel step: two gloo members, each with half the rows, end with exactly the
model (and prequential metrics) of one process stepping on all rows at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from headwater.servers import free_port
from learner.batch import decode_batch
from learner.trainer import TrainerSettings
from tests.learner.synth import SCHEMA_JSON, TINY_HEAD, make_payload

STEPS, ROWS = 3, 48


def _settings() -> TrainerSettings:
    return TrainerSettings(
        kind="fgcnn", head=dict(TINY_HEAD), embedding={"kind": "hashed", "buckets": 97, "dim": 4},
        reference_rows=256, dense_norm=True, wide=True, item_field="item", n_thresholds=50,
    )


def _batches(partition: int) -> list:
    return [decode_batch(make_payload(ROWS, s * ROWS, seed=10 * s + partition, partition=partition))
            for s in range(STEPS)]


def _member(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from learner.distributed import DataParallelStep, GroupConfig, init_group

    torch.set_num_threads(1)
    init_group(GroupConfig(rank, 2, f"127.0.0.1:{port}", timeout_seconds=60))
    try:
        trainer = _settings().build(SCHEMA_JSON)
        step = DataParallelStep(trainer)
        trained = [step([b], backlog=0).rows_trained for b in _batches(rank)]
        state = {k: v.clone() for k, v in trainer.learner.model.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        out[rank] = {"state": state, "trained": trained, "rows": trainer.rows_trained,
                     "auc": trainer.metrics.snapshot()["auc"],
                     "dirty": trainer.learner.model.embedding.dirty.copy()}
    finally:
        dist.destroy_process_group()


def test_two_members_equal_one_process_stepping_on_all_rows():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_member, args=(r, port, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0]
        got = dict(out)

    single = _settings().build(SCHEMA_JSON)
    for b0, b1 in zip(_batches(0), _batches(1), strict=True):
        assert single.step_many([b0, b1]).rows_trained == 2 * ROWS
    want = single.learner.model.state_dict()

    assert got[0]["trained"] == [2 * ROWS] * STEPS  # each step counts the group's rows
    assert got[0]["rows"] == got[1]["rows"] == single.rows_trained == 2 * STEPS * ROWS
    for key, value in got[0]["state"].items():
        # the members hold the same model bit for bit ...
        assert torch.equal(value, got[1]["state"][key]), key
        # ... which is the one-process model up to float summation order
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-5, msg=key)
    assert np.array_equal(got[0]["dirty"], single.learner.model.embedding.dirty)
    # rank 0's prequential metrics saw every member's rows, scored before training
    assert got[0]["auc"] == pytest.approx(single.metrics.snapshot()["auc"], abs=1e-6)
