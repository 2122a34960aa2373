"""APT detection on Linux audit logs (arXiv 2112.09008), pure Python.

Pipeline: :mod:`~detection.records` (parse raw/ENRICHED lines) and
:mod:`~detection.laurel` (LAUREL JSON) → :mod:`~detection.coalesce` (events)
→ :mod:`~detection.graph` (provenance graph, label transfer from
:mod:`~detection.tags`, reduction from :mod:`~detection.reduction`) →
:mod:`~detection.rules` (ATT&CK rules as data in ``detection/rules/*.yaml``) →
:mod:`~detection.alerts` (one growing alert per causal chain). The façade is
:class:`detection.engine.DetectionEngine`; :class:`detection.tail.AuditTailer`
follows a log file across rotations.
"""

from .engine import DetectionEngine, EngineConfig, Result
from .tail import AuditTailer

__all__ = ["DetectionEngine", "EngineConfig", "Result", "AuditTailer"]
