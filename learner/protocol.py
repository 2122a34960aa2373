"""The learner protocol (River's ``learn_many`` / ``predict_proba_many``) and adapters.

A *batch* is anything with ``categorical`` (int64 ``[n, F]``), ``dense`` (float32
``[n, D]``) and ``labels`` (``[n]``) — a :class:`~learner.batch.TrainBatch` or the
light :class:`Rows`. The trainer drives every model through this protocol, so FGCNN,
the torch baselines and River models are scored by exactly the same loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from learner.models import Ranker

__all__ = ["Batch", "Learner", "Publishable", "RiverLearner", "Rows", "TorchLearner", "concat_rows", "take"]


class Batch(Protocol):
    categorical: np.ndarray
    dense: np.ndarray
    labels: np.ndarray


@dataclass
class Rows:
    """A light batch: the three arrays a learner needs, plus optional event times."""

    categorical: np.ndarray
    dense: np.ndarray
    labels: np.ndarray
    ts: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def take(batch: Batch, index: np.ndarray) -> Rows:
    """Rows ``index`` (a boolean mask or integer positions) of any batch, as :class:`Rows`.

    >>> r = Rows(np.array([[1], [2], [3]]), np.zeros((3, 0), np.float32), np.array([0, 1, 0]))
    >>> take(r, np.array([False, True, True])).categorical.ravel().tolist()
    [2, 3]
    """
    ts = getattr(batch, "ts", None)
    return Rows(
        categorical=batch.categorical[index],
        dense=batch.dense[index],
        labels=batch.labels[index],
        ts=None if ts is None else ts[index],
    )


def concat_rows(batches: list[Batch]) -> Rows:
    """Several batches' rows as one :class:`Rows`, in order (event times kept if all have them).

    >>> a = Rows(np.array([[1]]), np.zeros((1, 0), np.float32), np.array([1]))
    >>> b = Rows(np.array([[2], [3]]), np.zeros((2, 0), np.float32), np.array([0, 1]))
    >>> r = concat_rows([a, b])
    >>> r.categorical.ravel().tolist(), r.labels.tolist()
    ([1, 2, 3], [1, 0, 1])
    """
    ts = [getattr(b, "ts", None) for b in batches]
    return Rows(
        categorical=np.concatenate([b.categorical for b in batches]),
        dense=np.concatenate([b.dense for b in batches]),
        labels=np.concatenate([np.asarray(b.labels) for b in batches]),
        ts=None if any(t is None for t in ts) else np.concatenate(ts),
    )


@runtime_checkable
class Learner(Protocol):
    """What the trainer needs from a model.

    ``learn_many``'s ``logit_offset`` is the correction for negatives kept with rate
    ``r`` (``-log r``); ``score_and_learn`` is test-then-train (scores from before the
    rows are learned).
    """

    def learn_many(self, batch: Batch, logit_offset: float = 0.0) -> None: ...

    def predict_proba_many(self, batch: Batch) -> np.ndarray: ...

    def score_and_learn(self, batch: Batch) -> np.ndarray: ...


@runtime_checkable
class Publishable(Protocol):
    """A learner whose state can be checkpointed and whose model serving can run."""

    def state_dict(self, optimizer: bool = True) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def serving_model(self) -> Ranker: ...


class TorchLearner:
    """A :class:`~learner.models.Ranker` trained on log-loss by Adam (or SGD / Adagrad).

    Embedding tables have sparse gradients and their own optimizer (``SparseAdam`` for
    Adam: the "lazy" Adam of large-scale CTR systems, moments move only for rows a batch
    touched); every other parameter uses the dense optimizer of the same family.
    ``embedding_lr`` (default: ``lr``) lets the tables move faster than the network: in
    one pass over a stream, each id is seen only a few times.

    ``reference_rows`` scales both learning rates by ``min(1, n / reference_rows)`` for a
    step of ``n`` rows: Adam moves every weight by about ``lr`` per step whatever the
    batch size, so without it a slow stream's many small steps would move the model
    once per handful of rows and chase the last labels.

    ``logit_offset`` in :meth:`learn_many` shifts the training logit (``-log r`` when
    negatives were kept with rate ``r``) so the model itself stays calibrated on the
    full distribution and served scores need no correction.
    """

    def __init__(
        self,
        model: Ranker,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        embedding_lr: float | None = None,
        reference_rows: int | None = None,
        wide_lr: float | None = None,
    ) -> None:
        self.model = model
        self.reference_rows = reference_rows
        #: the last step's EM3 content-ID loss (``None``: none computed)
        self.last_aux_loss: float | None = None
        families = {
            "adam": (torch.optim.Adam, torch.optim.SparseAdam),
            "sgd": (torch.optim.SGD, torch.optim.SGD),
            "adagrad": (torch.optim.Adagrad, torch.optim.Adagrad),
        }
        if optimizer not in families:
            raise ValueError(f"optimizer must be one of {sorted(families)}, got {optimizer!r}")
        dense_cls, sparse_cls = families[optimizer]
        table = model.embedding.table.weight
        wide = [] if getattr(model, "wide", None) is None else list(model.wide.parameters())
        fast = {id(p) for p in wide}
        rest = [p for p in model.parameters() if p is not table and id(p) not in fast]
        groups = [{"params": rest}] if rest else []
        if wide:
            # the wide part moves at the tables' rate: a linear model over standardised
            # counters needs weights of order one within a few hundred steps
            groups.append({"params": wide, "lr": wide_lr or embedding_lr or lr})
        self.optimizer = dense_cls(groups, lr=lr, weight_decay=weight_decay) if groups else None
        self.sparse_optimizer = sparse_cls([table], lr=embedding_lr or lr)
        self.model.embedding.attach_optimizer(self.sparse_optimizer)
        self._base_lr = [
            [g["lr"] for g in opt.param_groups]
            for opt in (self.optimizer, self.sparse_optimizer)
            if opt is not None
        ]

    @staticmethod
    def dense_tensor(batch: Batch) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(batch.dense, dtype=np.float32))

    def predict_proba_many(self, batch: Batch) -> np.ndarray:
        """P(label = 1) per row, without touching weights or table state."""
        self.model.eval()
        with torch.no_grad():
            logits = self.model.logits(batch.categorical, batch.dense)
        return torch.sigmoid(logits).numpy().astype(np.float64)

    def _step(self, batch: Batch, logit_offset: float) -> torch.Tensor:
        self.model.train()
        rows = self.model.embedding.lookup(batch.categorical)
        dense = self.dense_tensor(batch)
        em3 = getattr(self.model, "em3", None) is not None
        logits = self.model(rows, dense, batch.categorical) if em3 else self.model(rows, dense)
        y = torch.from_numpy(np.asarray(batch.labels, dtype=np.float32))
        loss = F.binary_cross_entropy_with_logits(logits + logit_offset, y)
        if em3 and self.model.aux_loss is not None:
            aux, self.model.aux_loss = self.model.aux_loss, None  # no graph kept on the model
            self.last_aux_loss = float(aux.detach())
            loss = loss + aux  # EM3 content-ID contrastive term
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        if self.reference_rows:
            self.scale_lr(min(1.0, len(y) / self.reference_rows))
        if self.optimizer is not None:
            self.optimizer.step()
        self.sparse_optimizer.step()
        self.model.observe_dense(dense)
        self.model.embedding.mark_dirty(rows)
        self.model.embedding.observe(batch.categorical, getattr(batch, "ts", None))
        return logits.detach()

    def scale_lr(self, scale: float) -> None:
        opts = [o for o in (self.optimizer, self.sparse_optimizer) if o is not None]
        for opt, base in zip(opts, self._base_lr, strict=True):
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"] = lr * scale

    def serving_model(self) -> Ranker:
        """The model a publication carries, i.e. what serving will run."""
        return self.model

    def learn_many(self, batch: Batch, logit_offset: float = 0.0) -> None:
        """One optimizer step on the batch's mean log-loss; then update table admission."""
        if len(batch.labels):
            self._step(batch, logit_offset)

    def score_and_learn(self, batch: Batch) -> np.ndarray:
        """Test-then-train in one forward pass when train mode scores like eval mode.

        The logits of the training forward are computed before the optimizer step, so
        they are honest prequential scores; with BatchNorm or dropout we score separately.
        """
        if not len(batch.labels):
            return np.zeros(0)
        if not self.model.train_equals_eval:
            probs = self.predict_proba_many(batch)
            self.learn_many(batch)
            return probs
        logits = self._step(batch, 0.0)
        return torch.sigmoid(logits).numpy().astype(np.float64)

    def state_dict(self, optimizer: bool = True) -> dict[str, Any]:
        """Weights, and (``optimizer=True``) both optimizers' moments."""
        opt = None
        if optimizer:
            opt = {
                "dense": self.optimizer.state_dict() if self.optimizer is not None else None,
                "sparse": self._packed_sparse_state(),
            }
        return {"model": self.model.state_dict(), "optimizer": opt}

    def _packed_sparse_state(self) -> dict[str, Any]:
        # Table-shaped moments are zero outside rows the table marked dirty: keep those rows.
        sd = self.sparse_optimizer.state_dict()
        shape = self.model.embedding.table.weight.shape
        rows = torch.from_numpy(np.flatnonzero(self.model.embedding.dirty))
        packed = {}
        for key, st in sd["state"].items():
            packed[key] = {
                k: {"rows": rows, "values": v[rows].clone()}
                if isinstance(v, torch.Tensor) and v.shape == shape
                else v
                for k, v in st.items()
            }
        return {"state": packed, "param_groups": sd["param_groups"]}

    def _unpack_sparse_state(self, sd: dict[str, Any]) -> dict[str, Any]:
        shape = self.model.embedding.table.weight.shape
        state = {}
        for key, st in sd["state"].items():
            out = {}
            for k, v in st.items():
                if isinstance(v, dict) and "rows" in v:
                    full = torch.zeros(shape, dtype=v["values"].dtype)
                    full[v["rows"]] = v["values"]
                    v = full
                out[k] = v
            state[key] = out
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load weights; optimizer moments too when present (else they restart at zero)."""
        self.model.load_state_dict(state["model"])
        opt = state.get("optimizer")
        if opt is not None:
            if self.optimizer is not None and opt.get("dense") is not None:
                self.optimizer.load_state_dict(opt["dense"])
            self.sparse_optimizer.load_state_dict(self._unpack_sparse_state(opt["sparse"]))


class RiverLearner:
    """Adapter running a River classifier over the same token rows, one row at a time.

    With ``one_hot`` (linear models) field ``f`` with token ``t`` becomes feature
    ``"f=t": 1.0``; without it (River's factorization machines, which one-hot string
    values themselves and need the field name) it becomes ``f: "t"``. Dense features
    pass through as floats. Not checkpointable: it exists for the benchmark.
    """

    def __init__(
        self, model: Any, fields: list[str], dense: list[str] | None = None, one_hot: bool = True
    ) -> None:
        self.model = model
        self.fields = list(fields)
        self.dense_names = list(dense or [])
        self.one_hot = one_hot

    def _dicts(self, batch: Batch) -> list[dict[str, Any]]:
        out = []
        for cat, den in zip(batch.categorical.tolist(), batch.dense.tolist(), strict=True):
            if self.one_hot:
                x: dict[str, Any] = {f"{f}={t}": 1.0 for f, t in zip(self.fields, cat, strict=True)}
            else:
                x = {f: str(t) for f, t in zip(self.fields, cat, strict=True)}
            x.update(zip(self.dense_names, den, strict=True))
            out.append(x)
        return out

    def predict_proba_many(self, batch: Batch) -> np.ndarray:
        return np.array(
            [self.model.predict_proba_one(x).get(True, 0.0) for x in self._dicts(batch)]
        )

    def learn_many(self, batch: Batch, logit_offset: float = 0.0) -> None:
        """One row at a time; ``logit_offset = -log r`` weighs negatives by ``1 / r``
        instead (River's linear models take sample weights, not logit offsets)."""
        negative_weight = math.exp(logit_offset)
        for x, y in zip(self._dicts(batch), batch.labels.tolist(), strict=True):
            if y or negative_weight == 1.0:
                self.model.learn_one(x, bool(y))
            else:
                self.model.learn_one(x, False, w=negative_weight)

    def score_and_learn(self, batch: Batch) -> np.ndarray:
        """Test-then-train: every row is scored before any is learned."""
        probs = self.predict_proba_many(batch)
        self.learn_many(batch)
        return probs
