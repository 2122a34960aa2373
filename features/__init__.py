"""Online features: stable tokens, counters in Redis, point-in-time training rows.

Modules: :mod:`features.hashing` (tokens), :mod:`features.schema` (the feature schema),
:mod:`features.counters` (declarative counter specs and their math),
:mod:`features.store` (the Redis online store and its Lua scripts),
:mod:`features.rows` (train and scoring rows), :mod:`features.movielens` (the dataset).

Nothing is imported here eagerly: ``import features.hashing`` must not pull in Redis.
"""
