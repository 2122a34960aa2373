"""A served ranker's forward pass run by TorchScript's interpreter, weights as inputs.

A one-candidate request's eager forward is mostly Python: module calls, attribute
lookups and one Python-to-C++ crossing per tensor op (~40 ops for DeepFM, more for
FGCNN). :class:`TracedForwards` records the forward once per *architecture* (model
class, spec, tensor shapes and dtypes) with every parameter and buffer as an input of
the graph, not a constant of it. Every version of that architecture — a full checkpoint,
or a delta patched onto one, about one a second — then runs on the same graph with its
own tensors: no trace per version.

Tracing records the ops of one call, so a forward whose ops depend on the data would be
wrong for other inputs. The rankers' forwards branch only on their configuration and
on shapes. Even so, :class:`serving.loader.ModelLoader` scores every version's
warm-up batch (the one its sanity check ran eagerly) through the graph too, and serves
the graph only if every probability is bit-identical; otherwise that version runs
eagerly. Models with EM3 fields (numpy inside the forward)
and models in training mode are never traced.

``torch.jit.trace`` is deprecated in favour of ``torch.export`` and ``torch.compile``
(docs/decisions.md, "The served forward traced once per architecture", says why it is
still the one used here, and what replaces it if it goes).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["TracedForwards"]

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _slots(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """``(qualified name, tensor, is parameter)`` of every parameter and buffer, in order."""
    return ([(n, t, True) for n, t in model.named_parameters()]
            + [(n, t, False) for n, t in model.named_buffers()])


def architecture(model: torch.nn.Module) -> tuple | None:
    """What a traced graph is valid for: class, spec and every tensor's name, shape and
    dtype (``None``: no spec, not traceable here).

    >>> from learner.models import build_model
    >>> spec = {"kind": "deepfm", "categorical": ["u"], "dense": ["x"],
    ...         "embedding": {"dim": 3, "buckets": 8}}
    >>> architecture(build_model(spec)) == architecture(build_model(spec))
    True
    >>> architecture(build_model({**spec, "dense": ["x", "y"]})) == architecture(build_model(spec))
    False
    """
    spec = getattr(model, "spec", None)
    if spec is None:
        return None
    return (type(model).__qualname__, json.dumps(spec.to_dict(), sort_keys=True, default=str),
            tuple((n, tuple(t.shape), str(t.dtype), p) for n, t, p in _slots(model)))


class TracedForwards:
    """Traced forward passes, one per architecture (at most ``max_graphs`` kept).

    :meth:`forward_for` gives a version's forward — ``rows, dense -> logits`` with the
    version's own tensors bound — or ``None`` when it runs eagerly.
    """

    def __init__(self, enabled: bool = True, max_graphs: int = 4) -> None:
        self.enabled = enabled
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, Any] = OrderedDict()  # architecture -> graph or None
        self._lock = threading.Lock()  # loads run on the loader thread; tests may load inline
        #: graphs traced, architectures whose trace failed, versions whose traced forward
        #: differed from the eager one (status and tests read them)
        self.traced = 0
        self.failed = 0
        self.mismatches = 0

    def stats(self, serving: Any = None) -> dict[str, Any]:
        """For ``/v1/status``: ``serving`` (a :class:`~serving.models.ServedModel`) runs
        traced or not, and the counters."""
        return {"enabled": self.enabled,
                "serving_traced": getattr(serving, "forward", None) is not None,
                "graphs": len(self._graphs), "traced": self.traced, "failed": self.failed,
                "mismatches": self.mismatches}

    def forward_for(self, model: torch.nn.Module, rows: torch.Tensor,
                    dense: torch.Tensor) -> Forward | None:
        """``model``'s traced forward (``rows``, ``dense``: an example input, used only the
        first time its architecture is seen), or ``None`` (eager)."""
        if not self.enabled or model.training or getattr(model, "em3", None) is not None:
            return None
        key = architecture(model)
        if key is None:
            return None
        with self._lock:
            if key not in self._graphs:
                # a failed trace is kept too (None): not tried again at every version
                self._graphs[key] = self._trace(model, rows, dense)
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            graph = self._graphs[key]
        return None if graph is None else functools.partial(graph, *(t for _, t, _ in _slots(model)))

    def _trace(self, model: torch.nn.Module, rows: torch.Tensor, dense: torch.Tensor) -> Any:
        slots = _slots(model)
        # the module tree copied, every tensor shared (never copied); the copy's slots then
        # hold the trace's inputs, so the graph reads them as inputs, not as constants
        template = copy.deepcopy(model, memo={id(t): t for _, t, _ in slots})
        # held in a dict emptied after the trace: the traced function keeps ``forward``
        # alive, and with it whatever the copy's slots were last given (the example's
        # tensors, maybe a large embedding table)
        held = {"template": template,
                "owners": [(template.get_submodule(n.rpartition(".")[0]),
                            n.rpartition(".")[2], p) for n, _, p in slots]}
        del template

        def forward(*args: torch.Tensor) -> torch.Tensor:
            for (owner, name, is_param), t in zip(held["owners"], args[:-2], strict=True):
                if is_param:
                    delattr(owner, name)  # a parameter slot takes only Parameters
                setattr(owner, name, t)
            return held["template"](args[-2], args[-1])

        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the deprecation notice (see the module doc)
                graph = torch.jit.trace(forward, (*(t for _, t, _ in slots), rows, dense),
                                        check_trace=False)
        except Exception as exc:  # noqa: BLE001 - any failure: this architecture runs eagerly
            self.failed += 1
            log.warning("serving: the forward of %s could not be traced (%r); it runs eagerly",
                        type(model).__qualname__, exc)
            return None
        finally:
            held.clear()
        self.traced += 1
        return graph
