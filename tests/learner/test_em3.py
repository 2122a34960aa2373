"""EM3 parts of the ranker: Fusion-Q-Former fields trained by the ranking loss, content-ID
loss, and item fields computed once per loaded version."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import torch

from learner.batch import decode_batch, encode_batch
from learner.em3 import ItemContentTable
from learner.models import build_model
from learner.trainer import TrainerSettings
from tests.learner.synth import TINY_HEAD, synthetic_columns

FIELDS = ["user", "item_id", "ctx"]
SCHEMA_JSON = json.dumps({"categorical": FIELDS, "dense": ["x"], "version": 1},
                         sort_keys=True, separators=(",", ":"))
EM3 = {"n_queries": 2, "content_dim": 12, "text_dim": 8, "d_model": 8, "n_heads": 2,
       "cid_weight": 0.1}


def payload(offset: int, seed: int) -> bytes:
    cols = synthetic_columns(64, offset, seed)
    cols["c:item_id"] = cols.pop("c:item")
    digest = hashlib.sha256(SCHEMA_JSON.encode()).hexdigest()
    return encode_batch(cols, SCHEMA_JSON, digest, "clicks", 0, offset, offset + 64)


def content_table() -> ItemContentTable:
    """Items 1..30 of the synthetic rows; the 'good' (even) ones share a text direction."""
    items = np.arange(1, 31)
    rng = np.random.default_rng(0)
    content = rng.normal(size=(30, 12)).astype(np.float32) * 0.1
    content[:, 0] += np.where(items % 2 == 0, 1.0, -1.0)
    table = ItemContentTable(12)
    table.update(items * 7_919 + 11, content)
    return table


def em3_trainer(em3: dict, schema_json: str, table: ItemContentTable):
    """A seeded trainer whose ranker has these EM3 parts, reading ``table``."""
    torch.manual_seed(0)
    trainer = TrainerSettings(head=TINY_HEAD, embedding={"buckets": 64}, lr=1e-2,
                              em3=em3).build(schema_json)
    trainer.learner.model.em3.attach(table)
    return trainer, trainer.learner.model


def test_qformer_fields_train_with_the_ranking_loss_and_serve_once_per_version():
    table = content_table()
    trainer, model = em3_trainer(EM3, SCHEMA_JSON, table)
    queries = model.em3.qformer.queries.detach().clone()
    for k in range(8):
        trainer.step(decode_batch(payload(64 * k, k)))
        loss = trainer.learner.last_aux_loss
        assert loss is not None and np.isfinite(loss) and loss > 0
    assert not torch.equal(queries, model.em3.qformer.queries)  # trained end to end
    assert copy.deepcopy(model).em3.table is table  # snapshots share the content

    # A published version: rebuilt from its spec and weights, its item fields computed
    # once at load for every known item, never per request.
    served = build_model(model.spec.to_dict())
    served.load_state_dict(model.state_dict())
    served.eval()
    served.em3.attach(table)
    assert served.em3.freeze() == 30
    computed = served.em3.computed
    batch = decode_batch(payload(10_000, 99))
    model.eval()
    with torch.no_grad():
        want = model.logits(batch.categorical, batch.dense)
        for _ in range(3):
            got = served.logits(batch.categorical, batch.dense)
            torch.testing.assert_close(got, want)
    assert served.em3.computed == computed  # no Q-Former pass per request

    # An item whose content arrives after the version loaded is computed once, on first use.
    table.update(np.array([31 * 7_919 + 11]), np.ones((1, 12), np.float32))
    cat = batch.categorical[:2].copy()
    cat[:, 1] = 31 * 7_919 + 11
    with torch.no_grad():
        served.logits(cat, batch.dense[:2])
        served.logits(cat, batch.dense[:2])
    assert served.em3.computed == computed + 1


def test_spec_without_em3_is_unchanged():
    spec = TrainerSettings(head=TINY_HEAD, embedding={"buckets": 64}).build(
        SCHEMA_JSON).learner.model.spec.to_dict()
    assert "em3" not in spec
