"""The one settings object, built once at the composition root from `WARMSTART_*` variables.

`WARMSTART_HOME=/x` sets `home`; nested fields use `__`: `WARMSTART_TEMPORAL__ADDRESS`.
Frozen dataclasses read by a small typed parser rather than pydantic-settings: importing
that (with pydantic) costs more start time than the whole `warmstart list` budget
(docs/decisions/0007-cli-start-time.md).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from api.errors import InvalidSpecError
from api.naming import CONTROL_TASK_QUEUE, LOCAL_NODE

if TYPE_CHECKING:
    from api.quarantine import QuarantinePolicy
    from api.storage import RemoteStorage

ENV_PREFIX = "WARMSTART_"
# The shape of what the kubelet writes into a container for each Service of its namespace
# (its "service links": `<NAME>_SERVICE_HOST`, `<NAME>_PORT_443_TCP_ADDR`...), so for the
# Service `warmstart-webhook` names that begin like settings.
SERVICE_LINK = re.compile(
    r"WARMSTART_\w*?_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"
)


@dataclass(frozen=True)
class TemporalSettings:
    address: str = "localhost:7233"
    namespace: str = "default"
    ui_port: int = 8233
    ui_host: str = "localhost"
    identity: str | None = None
    # AES-GCM key for every payload (workers/codec.py); off when unset.
    codec_key_file: str | None = None
    # TLS to the frontend: on with `tls`, or when any file below is set. `tls_ca_file`: the
    # CA that signed the server's certificate (default: the system's roots); a client
    # certificate and key for mutual TLS; the name the server's certificate must carry
    # (default: the address's host).
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_name: str | None = None
    # A file holding an API key, sent as a bearer token (Temporal Cloud); implies TLS.
    api_key_file: str | None = None

    @property
    def uses_tls(self) -> bool:
        files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file, self.api_key_file)
        return self.tls or any(files)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def ui_url(self) -> str:
        return f"http://{self.ui_host}:{self.ui_port}"

    def on_ports(self, *, port: int | None, ui_port: int | None) -> TemporalSettings:
        """These settings with the frontend and Web UI on other ports, where given."""
        host = self.address.rsplit(":", 1)[0]
        address = f"{host}:{port}" if port else self.address
        return dataclasses.replace(self, address=address, ui_port=ui_port or self.ui_port)


@dataclass(frozen=True)
class NodeSettings:
    name: str = LOCAL_NODE
    control_task_queue: str = CONTROL_TASK_QUEUE
    # Pollers hold activity slots while they wait; eager dispatch needs a free one left over.
    max_concurrent_activities: int = 16
    activity_pollers: int = 2
    # A cluster node: pods' containers on it are captured and restored through its container
    # runtime, its restore-target pods watched and Checkpoint Secrets read (through `kube`).
    cluster: bool = False
    # The node's container runtime (a name in `activities.runtime.registry`), its socket and
    # its state directory (containerd's shims write each container's init PID there).
    runtime: str = "containerd"
    runtime_endpoint: str = "/run/containerd/containerd.sock"
    runtime_state: str = "/run/containerd"
    # The kubelet's root directory on the node (its `--root-dir`), where a pod's emptyDir
    # holds its standby's control directory: the standby announces itself there.
    kubelet_root: str = "/var/lib/kubelet"
    # Local mode: the worker's own variables a workload may take as secrets
    # (`--env-secret NAME=env:VAR`), comma-separated; any other is refused, so a request can
    # never copy the worker's credentials into a workload.
    secret_env: str = ""
    # A restore into a pod past this many seconds gives up: the pod starts cold.
    restore_deadline_seconds: float = 1800.0


MAX_PRE_DUMPS = 8


@dataclass(frozen=True)
class CriuSettings:
    path: str | None = None
    # Local restores resume the process before its memory is back: CRIU's lazy-pages daemon
    # serves pages on fault and in the background (decision 0034). Where this kernel or CRIU
    # cannot (`criu check --feature uffd-noncoop`), restores run eagerly and say so.
    lazy_pages: bool = False
    # Captures run this many `criu pre-dump` rounds while the tree runs, then a final dump
    # of the pages dirtied since (decision 0037). Where this kernel cannot track dirty pages
    # (`criu check --feature mem_dirty_track`) or a round fails, the dump is plain and says so.
    pre_dumps: int = 0
    # At most this many local restores in CRIU at once on this node; the others wait in
    # arrival order, each at most its answer timeout (stage `criu-queue`, decision 0040).
    max_concurrent_restores: int = 8

    def __post_init__(self) -> None:
        if self.max_concurrent_restores < 1:
            raise InvalidSpecError(
                "WARMSTART_CRIU__MAX_CONCURRENT_RESTORES="
                f"{self.max_concurrent_restores}: expected at least 1"
            )
        if not 0 <= self.pre_dumps <= MAX_PRE_DUMPS:
            raise InvalidSpecError(
                f"WARMSTART_CRIU__PRE_DUMPS={self.pre_dumps}: expected 0 (no pre-dumps) to "
                f"{MAX_PRE_DUMPS}"
            )

    def resolve(self) -> str | None:
        """The configured binary, else the first `criu` on PATH (with /usr/local/sbin)."""
        if self.path:
            return self.path
        return shutil.which("criu") or shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin")


@dataclass(frozen=True)
class KubeSettings:
    """The cluster the controller works on (`warmstart controller`)."""

    # Where the controller keeps its Leases (checkpoint ID claims, watcher leadership).
    namespace: str = "warmstart-system"
    # API server URL; empty: the pod's service account, else the kubeconfig.
    server: str = ""
    # With `server`: a file holding a bearer token, and whether to skip TLS verification
    # (a development API server with a self-signed certificate).
    token_file: str = ""
    insecure_skip_tls_verify: bool = False
    # The RWX PVC holding the checkpoint root, mounted by GMS savers.
    checkpoint_claim: str = "warmstart-checkpoints"
    # How often a capture reads its pod when no watcher signal came.
    read_every_seconds: float = 30.0
    # How long a node step waits for the pod's node worker before the node counts as lost.
    node_timeout_seconds: float = 120.0
    # The watcher's Lease: how long a silent holder keeps it, and this replica's name
    # (empty: the host name, which is the pod's name).
    lease_seconds: int = 15
    identity: str = ""


@dataclass(frozen=True)
class WebhookSettings:
    """The admission webhook (`warmstart webhook`): AdmissionReview over HTTPS."""

    host: str = "0.0.0.0"
    port: int = 8443
    # PEM certificate and key (a mounted Secret). Without them a self-signed certificate for
    # `hosts` (comma-separated names and IPs) is made at start: for development only, since
    # the API server must be given its CA.
    cert_file: str = ""
    key_file: str = ""
    hosts: str = "localhost,127.0.0.1"
    # How long a pod's admission waits to read its Checkpoint before admitting it cold
    # (the webhook configuration gives the whole call at most 5 s).
    read_timeout_seconds: float = 2.0
    # PEM CA of the client certificate the API server presents to webhooks (its admission
    # configuration's kubeconfig): reviews are then answered to that client only.
    client_ca_file: str = ""
    # The labels of the nodes that run a node worker (`key=value`, comma-separated; the node
    # DaemonSet's nodeSelector): restore targets are scheduled only there.
    node_labels: str = "nvidia.com/gpu.present=true"

    def node_label_pairs(self) -> tuple[tuple[str, str], ...]:
        """`node_labels` as pairs; InvalidSpecError naming the setting for a bad entry."""
        pairs = []
        for entry in (part.strip() for part in self.node_labels.split(",")):
            if not entry:
                continue
            key, sep, value = entry.partition("=")
            if not sep or not key.strip():
                raise InvalidSpecError(
                    f"WARMSTART_WEBHOOK__NODE_LABELS: {entry!r} is not key=value"
                )
            pairs.append((key.strip(), value.strip()))
        return tuple(pairs)


@dataclass(frozen=True)
class CertificateSettings:
    """The webhook's certificate, made and renewed by the controller's Lease holder in the
    TLS Secret `warmstart-webhook-tls`, its CA put into the webhook configurations'
    caBundle (`workers.webhook_certificate`, decision 0032)."""

    # Off where something else makes it (cert-manager: the overlay of that name).
    manage: bool = True
    # How long a certificate is valid, and how long before its end it is replaced.
    validity_days: int = 365
    renew_days: int = 30
    # How often the Secret and the caBundles are checked (and put right).
    check_seconds: float = 600.0


@dataclass(frozen=True)
class TelemetrySettings:
    # Traces: printed, sent over OTLP (gRPC, to `otlp_endpoint` or the exporter's default).
    exporter: Literal["off", "console", "otlp"] = "off"
    otlp_endpoint: str | None = None
    service_name: str = "warmstart"
    # Metrics of the workers and the controller (`workers.metrics`, decision 0038): served
    # for Prometheus to scrape on `prometheus_host:prometheus_port` (`/metrics`), or pushed
    # over OTLP every `metrics_interval_seconds`. Task queue backlogs are asked of Temporal
    # every `backlog_every_seconds`.
    metrics: Literal["off", "prometheus", "otlp"] = "off"
    prometheus_host: str = "0.0.0.0"
    prometheus_port: int = 9464
    metrics_interval_seconds: float = 60.0
    backlog_every_seconds: float = 15.0


@dataclass(frozen=True)
class RetentionSettings:
    """Checkpoint retention (`warmstart gc`, the `warmstart-retention` Schedule): the
    default policy of every namespace, and how often the Schedule runs it."""

    interval_seconds: float = 3600.0
    keep_newest_per_identity: int = 3
    max_age_days: float | None = None
    max_total_bytes: int | None = None
    # A JSON file of per-namespace policies: {"<namespace>": {"keep_newest_per_identity":
    # 2, "max_age_days": 30, "max_total_bytes": 107374182400}}.
    policies_file: str | None = None


@dataclass(frozen=True)
class QuarantineSettings:
    """When failed restores quarantine a checkpoint version on a node class (the restore
    gate of every node and the control side's answers read the same records)."""

    # Distinct nodes whose restores of the version failed on the class; fewer is pending
    # evidence that refuses nothing. 0: by mode, 2 on a cluster, 1 in local mode (one node).
    min_nodes: int = 0
    # A node's evidence lapses this long after its latest failure (and the quarantine with
    # it, once fewer than `min_nodes` nodes' evidence holds).
    expiry_seconds: float = 86400.0

    def __post_init__(self) -> None:
        if self.min_nodes < 0:
            raise InvalidSpecError(
                f"WARMSTART_QUARANTINE__MIN_NODES={self.min_nodes}: expected 0 (by mode) or more"
            )

    def policy(self, *, cluster: bool) -> QuarantinePolicy:
        """These settings as the quarantine judges by them on a cluster or in local mode
        (imported here on first use)."""
        from api.quarantine import QuarantinePolicy

        min_nodes = self.min_nodes or (2 if cluster else 1)
        return QuarantinePolicy(min_nodes=min_nodes, expiry_seconds=self.expiry_seconds)


@dataclass(frozen=True)
class StorageSettings:
    """Where versions are published beyond the node, and how they move.

    Without a remote store (`s3_bucket`) the node's checkpoint root is the store (a PVC on
    a cluster). With one, every capture uploads its committed version there and restores
    fetch what their node lacks into the node cache. S3 credentials: boto3's standard chain
    (`AWS_*` variables, a profile, an instance or pod role); on a cluster a Checkpoint may
    name a Secret. A kind of remote store (`activities.storage.backends`) adds its fields
    here and its lines to `configured`, `location` and `own_endpoints`.
    """

    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint: str = ""
    s3_region: str = ""
    # Server-side encryption of every object: "" (the bucket's default), AES256 (SSE-S3)
    # or aws:kms (SSE-KMS, with `kms_key_id` or the account's default key).
    sse: Literal["", "AES256", "aws:kms"] = ""
    kms_key_id: str = ""
    # Bytes in flight per transfer are at most part_size_mib * concurrency.
    part_size_mib: int = 64
    concurrency: int = 16
    compression: Literal["off", "auto"] = "auto"  # zstd per file where a sample shows it pays
    # The node cache of fetched versions: least recently used ones not in use go first. At
    # most `cache_max_bytes`; unset, `cache_max_share` of the size of the filesystem that
    # holds the cache (reckoned when the node worker starts).
    cache_max_bytes: int | None = None
    cache_max_share: float = 0.5
    # A local restore of a version this node lacks starts CRIU before the page images are
    # fetched: a page source serves them on fault and fetches the rest in the background,
    # each 1 MiB checked against the version's chunk table (decision 0039). Needs lazy
    # restores (`WARMSTART_CRIU__LAZY_PAGES`); versions that cannot stream are downloaded
    # first, saying why.
    stream_restores: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.cache_max_share <= 1:
            raise InvalidSpecError(
                f"WARMSTART_STORAGE__CACHE_MAX_SHARE={self.cache_max_share}: expected a share "
                "of the disk above 0 and at most 1"
            )

    @property
    def configured(self) -> bool:
        """Whether a remote store is configured (read without importing pydantic)."""
        return bool(self.s3_bucket)

    def location(self) -> RemoteStorage | None:
        """The configured remote store, as requests carry it; None: the node's root."""
        from api.storage import RemoteStorage

        if self.s3_bucket:
            return RemoteStorage(
                kind="s3",
                bucket=self.s3_bucket,
                prefix=self.s3_prefix,
                endpoint=self.s3_endpoint,
                region=self.s3_region,
                sse=self.sse,
                kms_key_id=self.kms_key_id,
            )
        return None

    def own_endpoints(self) -> dict[str, tuple[str, str]]:
        """Kind → this worker's (endpoint, region), for locations that name none (a
        Checkpoint's bucket on a cluster is reached through the node's endpoint)."""
        return {"s3": (self.s3_endpoint, self.s3_region)}


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=lambda: Path.home() / ".local" / "state" / "warmstart")
    temporal: TemporalSettings = TemporalSettings()
    node: NodeSettings = NodeSettings()
    criu: CriuSettings = CriuSettings()
    kube: KubeSettings = KubeSettings()
    webhook: WebhookSettings = WebhookSettings()
    certificate: CertificateSettings = CertificateSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    retention: RetentionSettings = RetentionSettings()
    storage: StorageSettings = StorageSettings()
    quarantine: QuarantineSettings = QuarantineSettings()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from `WARMSTART_*` variables; a name or value that does not fit is an
        InvalidSpecError naming the variable."""
        values: dict[str, Any] = {}
        for key, value in environ.items():
            if key.upper().startswith(ENV_PREFIX):
                *parents, leaf = key[len(ENV_PREFIX) :].lower().split("__")
                node = values
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = (key, value)
        settings: Settings = _build(cls, values, ENV_PREFIX)
        return settings

    @property
    def checkpoint_root(self) -> Path:
        return self.home / "checkpoints"

    @property
    def dev_server_db(self) -> Path:
        return self.home / "temporal.db"


def _build(cls: type[Any], values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, given in values.items():
        if name not in names:
            where = given[0] if isinstance(given, tuple) else f"{prefix}{name.upper()}__*"
            known = ", ".join(f"{prefix}{n.upper()}" for n in sorted(names))
            hint = ""
            if SERVICE_LINK.fullmatch(where):
                hint = (
                    "; the kubelet writes such a variable for a Service of the pod's namespace "
                    "unless the pod spec sets enableServiceLinks: false"
                )
            raise InvalidSpecError(f"{where}: unknown setting (known: {known}){hint}")
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if isinstance(given, tuple):
                raise InvalidSpecError(f"{given[0]}: set its fields with {given[0]}__<FIELD>")
            kwargs[name] = _build(kind, given, f"{prefix}{name.upper()}__")  # type: ignore[arg-type]
        elif isinstance(given, tuple):
            kwargs[name] = _convert(kind, *given)
        else:
            raise InvalidSpecError(f"{prefix}{name.upper()}: is not a group of settings")
    return cls(**kwargs)


def _convert(kind: Any, variable: str, raw: str) -> object:
    """`raw` as `kind` (str, int, float, bool, Path, an optional or a Literal of them)."""
    if isinstance(kind, types.UnionType):  # X | None: an empty value means None
        if raw == "":
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        if raw not in allowed:
            raise InvalidSpecError(f"{variable}={raw!r}: expected one of {', '.join(allowed)}")
        return raw
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise InvalidSpecError(f"{variable}={raw!r}: expected an integer") from None
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise InvalidSpecError(f"{variable}={raw!r}: expected true or false")
        return raw.lower() in ("true", "1")
    if kind is float:
        try:
            value = float(raw)
        except ValueError:
            raise InvalidSpecError(f"{variable}={raw!r}: expected a number") from None
        if not 0 < value < float("inf"):
            raise InvalidSpecError(f"{variable}={raw!r}: expected a positive finite number")
        return value
    return Path(raw) if kind is Path else raw
