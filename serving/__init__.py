"""Serving: the model holder with hot swap, the scoring API, model admin and health.

Modules: :mod:`serving.holder` (versions, verified loads, atomic swaps, pin/rollback),
:mod:`serving.scoring` (request validation, features → rows → model),
:mod:`serving.watcher` (``model-updates`` topic + store rescan), :mod:`serving.metrics`
(Prometheus), :mod:`serving.app` (the aiohttp application and ``headwater serve``).
Nothing is imported eagerly: ``import serving`` must not pull in torch.
"""
