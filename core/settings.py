"""Headwater settings, declared once.

Each setting has one default, one environment variable (``HEADWATER_<NAME>``), one
doc string and, through :func:`headwater.cli`, one ``--<name>`` flag. Every process of
the stack reads the same object, so the worker, the learner and serving cannot
disagree about a topic name or a port.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

TOPIC_NAMES = ("clicks", "items", "audit", "train-batches", "model-updates", "alerts", "dead-letter",
               "impressions", "actions")


def repo_root() -> Path:
    """The directory holding ``pyproject.toml`` (the source checkout)."""
    return Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """Where the shared datasets are: ``$HEADWATER_DATA_DIR`` or ``../shared/datasets``."""
    env = os.environ.get("HEADWATER_DATA_DIR")
    return Path(env) if env else repo_root().parent / "shared" / "datasets"


def store_location(value: Any) -> Any:
    """``s3://bucket/prefix`` stays a URL; anything else is a local directory.

    >>> store_location("s3://models/prod"), store_location("/var/lib/models")
    ('s3://models/prod', PosixPath('/var/lib/models'))
    """
    if isinstance(value, str) and value.startswith("s3://"):
        return value
    return Path(value) if isinstance(value, (str, os.PathLike)) else value


def is_object_store(location: Path | str) -> bool:
    """Whether a ``model_store`` setting names an object store (``s3://``).

    >>> is_object_store("s3://models/prod"), is_object_store(Path("s3"))
    (True, False)
    """
    return isinstance(location, str) and location.startswith("s3://")


class Settings(BaseSettings):
    """Every knob of the stack; environment variables are ``HEADWATER_`` + upper name."""

    model_config = SettingsConfigDict(env_prefix="HEADWATER_", extra="ignore")

    kafka: str | None = Field(
        None, description="Kafka bootstrap servers (host:port,...). Empty: the embedded broker."
    )
    redis: str | None = Field(None, description="Redis URL. Empty: the embedded Redis server.")
    topic_prefix: str = Field("", description="Prepended to every topic name.")
    partitions: int = Field(4, ge=1, description="Partitions per topic created on start.")
    replication_factor: int = Field(
        1, ge=1, description="Replicas per topic created on start (a real cluster: 3)."
    )
    state_dir: Path = Field(
        Path(".headwater"), description="Run state: pids, logs, embedded Redis data."
    )
    model_store: Annotated[Path | str, BeforeValidator(store_location)] = Field(
        Path(".headwater/models"),
        description="Model store: a directory, or s3://bucket/prefix for S3-compatible object "
        "storage (learner and serving then need not share a disk; docs/contracts.md).",
    )
    model_store_endpoint: str | None = Field(
        None, description="Object store endpoint URL (MinIO, Ceph...). Empty: AWS S3 itself."
    )
    model_store_region: str | None = Field(None, description="Object store region (AWS: required).")
    model_store_access_key: str | None = Field(
        None, description="Object store access key id. Empty: the AWS default credential chain."
    )
    model_store_secret_key: SecretStr | None = Field(
        None, description="Object store secret key (never printed)."
    )
    model_name: str = Field("ranker", description="Name of the ranking model in the store.")
    features: Path | None = Field(
        None, description="Feature definition YAML (docs/features.md). Empty: the MovieLens one."
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="Datasets directory.")
    bind_host: str = Field("127.0.0.1", description="Interface every service binds to.")
    http_port: int = Field(8000, description="Serving HTTP port (scoring, ops API, dashboard).")
    worker_port: int = Field(8010, description="Worker HTTP port (/metrics, /healthz).")
    worker_procs: int = Field(
        1, ge=1, le=32,
        description="Worker processes `headwater up` starts; they share the partitions as one "
        "consumer group, the i-th (from 0) on worker_port + i (docs/scale-out.md).",
    )
    learner_port: int = Field(8020, description="Learner HTTP port (/metrics, /healthz).")
    kafka_port: int = Field(19092, description="Embedded broker port (0: pick a free one).")
    redis_port: int = Field(16379, description="Embedded Redis port (0: pick a free one).")
    redis_appendfsync: str = Field(
        "everysec",
        description="Embedded Redis AOF fsync policy: always, everysec or no (bench/redis_fsync.py).",
    )
    admin_token: SecretStr | None = Field(
        None, description="Token for admin endpoints; unset disables them (never open)."
    )
    click_batch_size: int = Field(2000, ge=1, description="Max click messages per agent batch (a message is one event or an envelope of events).")
    click_batch_within: float = Field(
        0.02, gt=0,
        description="Seconds at most a click take keeps collecting after its first message "
        "(it closes sooner when full or when no message came for click_batch_gap).",
    )
    click_batch_events: int = Field(
        50000, ge=1,
        description="Max click events per take, envelopes counted by their events (a bigger "
        "single message is a take of its own); click_batch_size still bounds messages.",
    )
    click_batch_gap: float = Field(
        0.002, ge=0,
        description="A click take keeps collecting only while messages arrive at most this "
        "many seconds apart or the consumer has not fetched up to the log end (a backlog): an "
        "idle stream's lone message waits this long, not click_batch_within.",
    )
    click_batch_backlog_within: float = Field(
        1.0, ge=0,
        description="Seconds at most a click take keeps collecting while the consumer has a "
        "backlog (fetched less than the log end): bigger takes cost less per event, and those "
        "messages wait anyway (single-event messages reach click_batch_size in ~1 s). Below "
        "click_batch_within it has no effect.",
    )
    click_pipeline_depth: int = Field(
        1, ge=0,
        description="Click takes whose rows are being produced and offsets acknowledged while "
        "the next take is handled (0: one take at a time). Each is replayed after a crash.",
    )
    audit_batch_size: int = Field(2000, ge=1, description="Max audit messages per agent batch.")
    audit_batch_within: float = Field(
        0.05, gt=0,
        description="Seconds an audit take collects messages before it is handled (or "
        "audit_batch_size messages): a longer take spreads the per-batch costs (state "
        "writes, alert chains) over more records, and adds up to this much latency.",
    )
    worker_gc_young: int = Field(
        20000, ge=0,
        description="The worker collects its youngest garbage generation every this many "
        "allocations and freezes its start-up heap out of the collector's walks "
        "(core/heap.py): big click takes then trigger few collections. 0: Python's defaults.",
    )
    pit_ties: bool = Field(
        False,
        description="Pre-event counters also count contributions at exactly the event's time "
        "(docs/point-in-time.md); off: strictly earlier only.",
    )
    pit_history: int = Field(
        32, ge=0,
        description="K: each counter entity keeps its latest K to 2K-1 events per partition "
        "shard so a row reads only contributions older than it (docs/point-in-time.md).",
    )
    # --- detection: learned per-host baseline (issue 16) ---
    audit_learn: bool = Field(
        True, description="Learn each host's normal behaviour online and use it for alert severity."
    )
    audit_baseline_half_life: float = Field(
        7 * 86400.0, gt=0, description="Seconds (log time) after which a learned count has halved."
    )
    audit_baseline_ttl: int = Field(
        30 * 86400, gt=0,
        description="Seconds a host's learned baseline stays in Redis after its last audit batch.",
    )
    audit_snapshot_every: int = Field(
        16, ge=1,
        description="Audit batches of a host between snapshots of its whole detection state; "
        "the batches between go to a journal replayed on load (1: a snapshot every batch).",
    )
    audit_journal_max_bytes: int = Field(
        1_000_000, ge=1,
        description="Bytes of a host's detection journal (compressed lines) that force a snapshot "
        "before audit_snapshot_every batches.",
    )
    # --- end detection baseline ---
    train_message_rows: int = Field(
        256, ge=1, description="Most rows per Arrow message the worker writes on train-batches.",
    )
    learner_step_rows: int = Field(
        256, ge=1,
        description="Rows per learner step: messages accumulate up to this many rows ...",
    )
    learner_step_wait_seconds: float = Field(
        2.0, ge=0,
        description="... or until the oldest waiting row is this old (a slow stream still steps).",
    )
    learner_max_staleness_seconds: float = Field(
        600.0, ge=0,
        description="Learner skips (never trains) train-batches messages older than this; 0: off.",
    )
    # -- data-parallel learner (issue 12): learner.distributed --
    learner_procs: int = Field(
        1, ge=1,
        description="Learner processes training one model (torch.distributed gloo, data parallel).",
    )
    learner_rank: int = Field(
        0, ge=0, description="This learner's rank in its group (set per member; see docs).",
    )
    learner_world_size: int = Field(
        1, ge=1, description="Members of the learner group; above 1 this process is one member.",
    )
    learner_master: str = Field(
        "127.0.0.1:29400", description="host:port of the learner group's store (rank 0 hosts it).",
    )
    learner_generation: int = Field(
        0, ge=0, description="Learner group generation (set by the supervisor on each re-form).",
    )
    learner_store_hosted: bool = Field(
        False, description="The group store is hosted by a supervisor, not by rank 0.",
    )
    served_lag_delay_seconds: float = Field(
        1.0, ge=0,
        description="Served-lag AUC: seconds from a publication until serving runs it.",
    )
    served_lag_sample: float = Field(
        0.25, gt=0, le=1, description="Share of rows the served-lag AUC scores (a forward each).",
    )
    model_wide: bool = Field(
        True, description="Ranker: standardised dense counters and a wide linear part (Wide & Deep).",
    )
    publish_every_seconds: float = Field(
        5.0, gt=0, description="Learner full-checkpoint period (s); also on demand and at stop."
    )
    delta_every_seconds: float = Field(
        1.0,
        ge=0,
        description="Learner delta period (s): between full checkpoints, publish only the "
        "weights changed since the last one, so serving is fresh within about 2 s (0: off, "
        "full checkpoints only). docs/decisions.md says why 1 s.",
    )
    publish_every_rows: int = Field(
        50_000, ge=1, description="Learner also publishes after this many new rows."
    )
    keep_versions: int = Field(10, ge=2, description="Model versions kept (plus pinned ones).")
    session_timeout: float = Field(
        6.0,
        gt=0,
        description="Consumer-group session timeout (s). Tansu holds a join for half of it.",
    )
    fetch_max_wait_ms: int = Field(
        100, ge=1,
        description="Fetch long-poll wait of the stream worker and of serving's model "
        "watcher (at most 100 ms there); Tansu does not wake early on new data.",
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, description="Largest accepted event message (bigger: dead-letter)."
    )
    producer_batch_bytes: int = Field(
        1024 * 1024, ge=16384,
        description="Bytes the worker's producer packs into one batch per partition: a "
        "train-batches message of 256 rows is ~120 KB, so Faust's 16 KB default sent each in "
        "a request of its own.",
    )
    max_candidates: int = Field(1000, ge=1, description="Largest candidate list /v1/score takes.")
    serve_baseline: bool = Field(
        True, description="Before a first model, /v1/score ranks by item smoothed CTR ('baseline').",
    )
    max_body_bytes: int = Field(1024 * 1024, description="Largest HTTP body serving accepts.")
    content_encoder: str = Field(
        "minilm", description="Item text encoder: minilm (offline sentence model) or hashing."
    )
    code_levels: int = Field(3, ge=1, le=6, description="RQ-Kmeans levels (QARM: up to 6).")
    codebook_size: int = Field(64, ge=2, description="Codes per RQ level (64 suits ~2k items).")
    vq_k: int = Field(8, ge=1, description="VQ code: nearest items kept (QARM: 25).")
    model_kind: str = Field(
        "fgcnn", description="Ranker: fgcnn (the paper's), ipnn, deepfm or lr (learner/models)."
    )
    model_preset: str = Field(
        "lean",
        description="Size preset of the ranker: lean (CPU-sized, the default), stream, compact "
                    "or criteo (learner/models/fgcnn.py).",
    )
    downsample_backlog_rows: int = Field(
        50_000, ge=0,
        description="Learner backlog (rows) above which negatives are down-sampled; 0 disables.",
    )
    downsample_negative_rate: float = Field(
        0.25, gt=0, le=1, description="Share of negatives kept while down-sampling (log-odds corrected)."
    )
    embedding_buckets: int = Field(
        8192, ge=16, description="Hashed embedding rows per categorical field (collisions vs size)."
    )
    embedding_dim: int = Field(16, ge=1, description="Embedding size k of every field.")
    codebook_refresh_seconds: float = Field(
        900.0, gt=0, description="How often the items agent re-fits codebooks on recent items."
    )
    codebook_lease_seconds: float = Field(
        300.0, gt=0,
        description="Expiry of the codebook fitter's lease in Redis (one fitter at a time; "
                    "a fitter that dies frees it after this long).",
    )
    align_online: bool = Field(
        False,
        description="QARM alignment online: workers mine <trigger, target> pairs from clicks "
                    "and each codebook refresh trains the alignment projection on them first.",
    )
    align_window: int = Field(20, ge=1, description="Recent clicks per user a trigger is chosen from.")
    align_max_pairs: int = Field(
        8192, ge=2, description="Most recent mined pairs kept in Redis (the projection's training set)."
    )
    align_min_pairs: int = Field(
        256, ge=2, description="Pairs needed before a refresh trains the alignment projection."
    )
    align_epochs: int = Field(1, ge=1, description="Passes over the pairs per projection re-fit.")
    align_lr: float = Field(3e-4, gt=0, description="Adam learning rate of the projection re-fit.")
    align_decay: float = Field(
        10.0, ge=0,
        description="Pull of each re-fit towards the published projection (keeps codes stable).",
    )
    align_temperature: float = Field(0.07, gt=0, description="InfoNCE temperature of the alignment.")
    em3_queries: int = Field(
        0, ge=0,
        description="EM3 Fusion-Q-Former fields in the ranker (trainable queries over each "
                    "item's stored content); 0 = off.",
    )
    em3_cid_weight: float = Field(
        0.0, ge=0, description="Weight of EM3's content-ID contrastive loss (needs EM3 fields); 0 = off."
    )
    em3_cid_temperature: float = Field(0.1, gt=0, description="Temperature of the content-ID loss.")
    seq_len: int = Field(
        0, ge=0, le=64,
        description="Recent clicks per user the online store keeps point in time and every row "
                    "carries (fields seq0, newest, ...): EM3's content-interest sequence; 0 = off.",
    )
    em3_seq_lora_rank: int = Field(
        0, ge=0,
        description="EM3 content-interest sequence in the ranker: rank of the LoRA adapters on "
                    "its frozen attention over the seq fields' item content (needs seq_len and "
                    "EM3 fields); 0 = off.",
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads for the learner.")
    log_level: str = Field("INFO", description="Log level for every service.")
    # -- reaching a secured Kafka (core/kafka.py builds every client with these) --
    kafka_security_protocol: str = Field(
        "PLAINTEXT", description="Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    kafka_sasl_mechanism: str = Field(
        "PLAIN", description="SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (never printed).")
    kafka_ssl_cafile: str | None = Field(None, description="CA bundle that signed the brokers' certificates.")
    kafka_ssl_certfile: str | None = Field(None, description="Client certificate (mutual TLS).")
    kafka_ssl_keyfile: str | None = Field(None, description="Client certificate's private key (mutual TLS).")
    serve_inference_threads: int = Field(
        0, ge=0,
        description="Threads that encode rows and run the forward pass; 0 runs them on the "
                    "event loop (no thread hand-off: fastest per request; scale with --workers).",
    )
    serve_batch_rows: int = Field(
        1024, ge=0,
        description="Dynamic batching: scoring on the event loop runs one forward pass for "
                    "the rows of all requests ready in the same loop turn, at most this many "
                    "rows per pass; 0 runs one forward per request.",
    )
    serve_read_rows: int = Field(
        2048, ge=0,
        description="Coalesced feature reads: the reads of all requests that ask in the same "
                    "event-loop turn go to Redis and serving's cache as one read of at most "
                    "this many rows (each request is answered at that read's time); 0 reads "
                    "per request.",
    )
    serve_redis_round_trips: bool = Field(
        True,
        description="Serving's feature reads go over its own plain connections, written and "
                    "parsed with hiredis (core.redis_client.RoundTrips), not redis-py's "
                    "pipeline: ~0.3 ms less CPU per request. redis:// and unix:// servers "
                    "only; TLS and clusters always use redis-py.",
    )
    serve_traced_forward: bool = Field(
        True,
        description="Serving runs each model version's forward through a TorchScript graph "
                    "traced once per architecture, weights as inputs (serving/traced.py), "
                    "when it scores the warm-up batch bit for bit as the eager forward; "
                    "off: every forward is eager.",
    )
    serve_feature_tracking: bool = Field(
        True,
        description="Serving keeps every counter state and user's attributes it read in "
                    "memory, and Redis tells it which keys changed (client tracking, "
                    "core/redis_tracking.py): a request reads only what changed since. "
                    "Needs HEADWATER_SERVE_REDIS_ROUND_TRIPS; off (or while the "
                    "invalidation channel is down): the TTL cache below.",
    )
    serve_feature_cache_seconds: float = Field(
        0.5, ge=0,
        description="Without tracking, serving keeps counter states of user-independent "
                    "entities (items, genres, hour, device) this long between Redis "
                    "reads; 0 reads every request. A user's own counters are always read.",
    )
    serve_drain_seconds: float = Field(
        2.0, ge=0,
        description="A stopping serving process answers its open connections (with "
                    "Connection: close) this long before closing them.",
    )
    serve_workers: int = Field(
        1, ge=1,
        description="Serving processes sharing the HTTP port (headwater serve --workers N).",
    )
    serve_accept_defer_seconds: float = Field(
        0.02, ge=0,
        description="With --workers N, a worker holding more open connections than another "
                    "leaves a new connection queued for that one at most this long, then "
                    "accepts it anyway (serving/balance.py); 0 accepts at once.",
    )
    # -- state across restarts (issue 13) --
    duplicate_window: int = Field(
        200_000, ge=1,
        description="Event ids per click partition kept in Redis to refuse duplicates "
                    "(across worker restarts and gap re-reads): at least this many of the most "
                    "recently recorded ids, evicted a generation of this many at a time.",
    )
    score_redis_retry_seconds: float = Field(
        3.0, ge=0,
        description="How long a scoring request retries its feature read through a Redis "
                    "restart or outage before failing (bounded backoff).",
    )

    # -- impressions, actions and the online joiner (issue 17) --
    impression_log: bool = Field(
        True, description="Serving logs every /v1/score response to the impressions topic.",
    )
    impression_buffer: int = Field(
        10_000, ge=1,
        description="Responses serving holds for the impressions topic; when full, new ones "
                    "are dropped and counted (headwater_serving_impressions_dropped_total), "
                    "never waited for.",
    )
    impression_linger_ms: int = Field(
        50, ge=0,
        description="Serving's impressions producer gathers records this long before it "
                    "sends them (one produce request per interval instead of one per "
                    "answer: the producer's thread takes the GIL from request handling).",
    )
    join: bool = Field(
        False,
        description="The worker runs the online joiner (impressions + actions -> one labelled "
                    "row per impression, and the impression and click counters). Turn it on "
                    "where producers log actions instead of labelled click events. Off, the "
                    "labelled clicks path alone labels and counts: with both on for the same "
                    "traffic every impression would be counted twice and trained twice (once "
                    "labelled, once as a joined row labelled 0 when no action comes).",
    )
    join_window_seconds: float = Field(
        600.0, gt=0,
        description="Attribution window: an action within this many seconds (event time) "
                    "after its impression labels it 1; when the window closes without one, 0.",
    )
    join_lateness_seconds: float = Field(
        5.0, ge=0,
        description="Joiner watermark: the lower of the impressions' and actions' newest "
                    "event times, minus this much out-of-orderness.",
    )
    join_idle_seconds: float = Field(
        10.0, gt=0,
        description="A join partition side without messages this long (wall clock) stops "
                    "holding the watermark back; with both sides idle it advances with the clock.",
    )

    @cached_property
    def topics(self) -> dict[str, str]:
        """Logical topic name -> real topic name (prefix applied)."""
        return {name: f"{self.topic_prefix}{name}" for name in TOPIC_NAMES}

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token else None


def settings_table() -> list[tuple[str, str, str, str]]:
    """(name, env var, default, doc) for every setting: the docs and ``--help`` use it."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default
        rows.append((name, f"HEADWATER_{name.upper()}", str(default), field.description or ""))
    return rows
