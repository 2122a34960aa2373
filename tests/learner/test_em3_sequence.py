"""EM3's content-interest sequence: LoRA-adapted attention over the content of the user's
recent clicks (rows' ``seq`` fields), trained by the ranking loss, served from the rows."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from features.counters import CounterConfig
from features.hashing import hash_tokens
from features.rows import RowBuilder, RowConfig
from learner.batch import decode_batch, encode_batch
from learner.em3 import ItemContentTable
from learner.metrics import exact_auc
from learner.models import build_model
from learner.trainer import TrainerSettings
from tests.learner.synth import TINY_HEAD
from tests.learner.test_em3 import em3_trainer

L = 3
FIELDS = ["user_id", "item_id", *(f"seq{k}" for k in range(L))]
SCHEMA_JSON = json.dumps({"categorical": FIELDS, "dense": ["x"], "version": 1},
                         sort_keys=True, separators=(",", ":"))
EM3 = {"n_queries": 1, "content_dim": 6, "text_dim": 4, "d_model": 8, "n_heads": 2,
       "seq_lora_rank": 2}
ITEMS = np.arange(1, 41)


def token(items):
    return np.asarray(items) * 7_919 + 11


def content_table() -> ItemContentTable:
    """Odd items lean one way in content, even ones the other."""
    rng = np.random.default_rng(0)
    content = rng.normal(size=(len(ITEMS), 6)).astype(np.float32) * 0.3
    content[:, 0] += np.where(ITEMS % 2 == 0, 1.0, -1.0)
    table = ItemContentTable(6)
    table.update(token(ITEMS), content)
    return table


def payload(offset: int, seed: int, n: int = 128) -> bytes:
    """A click is likely when the candidate is of the kind the user clicked lately: only
    the sequence tells (items and users alone carry no signal)."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(2, size=n)  # the user's current interest
    seq = 2 * rng.integers(1, 21, size=(n, L)) - kind[:, None]  # items of that kind
    seq[rng.random((n, L)) < 0.2] = 0  # some rows have fewer clicks
    items = rng.integers(1, 41, n)
    match = (items % 2) == (1 - kind)
    labels = (rng.random(n) < np.where(match, 0.85, 0.15)).astype(np.int8)
    cols = {"event_id": np.array([f"e{offset + i}" for i in range(n)]),
            "ts": 1e9 + offset + np.arange(n, dtype=np.float64), "label": labels,
            "offset": offset + np.arange(n, dtype=np.int64), "sub": np.zeros(n, np.int32),
            "c:user_id": rng.integers(1, 500, n) * 1_000_003, "c:item_id": token(items),
            "d:x": rng.normal(size=n).astype(np.float32)}
    for k in range(L):
        cols[f"c:seq{k}"] = np.where(seq[:, k] > 0, token(seq[:, k]), 0)
    digest = hashlib.sha256(SCHEMA_JSON.encode()).hexdigest()
    return encode_batch(cols, SCHEMA_JSON, digest, "clicks", 0, offset, offset + n)


def test_lora_sequence_learns_the_users_interest_and_serves_the_same_logits():
    table = content_table()
    trainer, model = em3_trainer(EM3, SCHEMA_JSON, table)
    seq = model.em3.sequence
    frozen = {n: p.detach().clone() for n, p in seq.named_parameters() if not p.requires_grad}
    assert frozen and all(".base_layer." in n for n in frozen)
    for k in range(40):
        trainer.step(decode_batch(payload(128 * k, k)))
    for n, p in seq.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # the base stays as it was
    assert all(float(p.detach().abs().sum()) > 0  # the adapters trained
               for n, p in seq.named_parameters() if "lora_B" in n)

    batch = decode_batch(payload(1_000_000, 999, n=1024))
    model.eval()
    with torch.no_grad():
        want = model.logits(batch.categorical, batch.dense)
    assert exact_auc(np.asarray(batch.labels), want.numpy()) > 0.75
    emptied = batch.categorical.copy()
    emptied[:, 2:] = 0  # no recent clicks: the interest is gone
    with torch.no_grad():
        blind = model.logits(emptied, batch.dense)
    assert exact_auc(np.asarray(batch.labels), blind.numpy()) < 0.6

    # The published version (spec + weights, EM3 fields frozen at load) scores alike.
    served = build_model(model.spec.to_dict())
    served.load_state_dict(model.state_dict())
    served.eval()
    served.em3.attach(table)
    served.em3.freeze()
    with torch.no_grad():
        torch.testing.assert_close(served.logits(batch.categorical, batch.dense), want)


def test_a_sequence_model_needs_seq_fields():
    spec = TrainerSettings(head=TINY_HEAD, em3=EM3)
    with pytest.raises(ValueError, match="HEADWATER_SEQ_LEN"):
        spec.build(json.dumps({"categorical": ["user_id", "item_id"], "dense": ["x"]}))


def test_rows_carry_the_recent_clicks_newest_first_for_training_and_scoring():
    builder = RowBuilder(RowConfig(counters=CounterConfig(specs=()), seq_len=2))
    assert builder.schema.categorical[-2:] == ["seq0", "seq1"]
    events = {"event_id": ["a", "b"], "ts": [10.0, 20.0], "user_id": ["u", "v"],
              "item_id": ["i9", "i9"], "label": [1, 0], "offset": [0, 1], "sub": [0, 0]}
    rows = builder.build(events, {}, sequences=[("i1", "i2", "i3"), ()])
    tok = dict(zip(("i2", "i3"), hash_tokens("item_id", ["i2", "i3"]).tolist(), strict=True))
    assert rows["c:seq0"].tolist() == [tok["i3"], 0] and rows["c:seq1"].tolist() == [tok["i2"], 0]
    with pytest.raises(ValueError, match="recent clicks"):
        builder.build(events, {})
    scoring = builder.build_for_scoring("u", None, None, ["x", "y"], {"user_seq": [("i3",)] * 2})
    assert scoring["c:seq0"].tolist() == [tok["i3"]] * 2 and scoring["c:seq1"].tolist() == [0, 0]
