"""Putting the operator together: kopf settings, the handler registry, credentials, and running it.

Why an explicit registry and settings object (not kopf's module-level defaults): the tests run the operator
in-process, several times per session and with or without the webhook, against a kubeconfig of their own;
everything one run needs is built here from `Settings` and nothing leaks into the next.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import kopf

from kubetune_operator import certs, handlers, metrics, webhook
from kubetune_operator.builders.shared_server import LABEL_SERVER
from kubetune_operator.kube import Kube, load_configuration
from kubetune_operator.meta import LABEL_JOB
from kubetune_operator.reconcile import Reconciler
from kubetune_operator.settings import Settings

log = logging.getLogger(__name__)
PREFIX = "kubetune.io"


def _connection_info(cfg: Any, settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        trust_env=settings.networking.trust_env,
    )


def configure(kopf_settings: kopf.OperatorSettings, op: Settings, cert_dir: Path | None) -> None:
    """kopf's settings for this operator."""
    s = kopf_settings
    # kopf's bookkeeping in annotations under our prefix; status.kopf would be pruned by the structural schema.
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    s.persistence.finalizer = f"{PREFIX}/finalizer"
    # After its own annotation patch kopf waits for that resource version before it looks at the object again.
    # The default (5 s) runs out on a busy API server, and kopf then takes an older event (e.g. our status
    # write) for a fresh creation and runs the handler a second time: harmless (idempotent), but wasted work.
    s.persistence.consistency_timeout = 30.0
    # Our own Events describe transitions; kopf's per-handler "succeeded" Events would double the API traffic.
    s.posting.level = logging.WARNING
    s.posting.reporting_component = "kubetune-operator"
    _configure_watching(s)
    s.peering.standalone = op.peering is None
    if op.peering is not None:
        s.peering.name = op.peering
        s.peering.priority = op.peering_priority
        s.peering.lifetime = op.peering_lifetime
    s.execution.max_workers = op.max_workers
    if op.webhook:
        host = op.webhook_host or op.webhook_addr
        cert = certs.existing_serving_cert(Path(op.webhook_cert_dir)) if op.webhook_cert_dir else None
        if cert is None:
            assert cert_dir is not None
            hosts = [h for h in (host, op.webhook_addr) if h not in ("0.0.0.0", "::")]  # noqa: S104 - a comparison, not a bind
            cert = certs.make_serving_cert(cert_dir, hosts or ["127.0.0.1"])
        s.admission.server = kopf.WebhookServer(
            addr=op.webhook_addr,
            port=op.webhook_port,
            host=host,
            certfile=str(cert.certfile),
            pkeyfile=str(cert.pkeyfile),
            cafile=str(cert.cafile),
        )
        if op.webhook_managed:
            s.admission.managed = op.webhook_config_name


def _configure_watching(s: kopf.OperatorSettings) -> None:
    """What the watch streams bring in, and how long kopf keeps it (docs/operator.md, "Memory per job").

    kopf filters handlers' labels on the client: without a server-side selector every ConfigMap in the watched
    namespaces (each job's trainer config, its history) is sent, parsed, queued to a worker of its own and
    remembered for good, only to match no handler. The only ConfigMap handler wants the shared-server label, and
    the only RayJob handler our job label, so the API server may filter them. (Deployments have two handlers
    with different labels, and a selector cannot say "either": they stay unfiltered; there are few.)
    """
    s.watching.label_selectors["configmaps"] = LABEL_SERVER
    s.watching.label_selectors["ray.io", "rayjobs"] = LABEL_JOB
    # kopf's per-object worker keeps the last event's body until it exits, idle_timeout seconds after that
    # event (default 5 s): in a burst of new jobs that pins one full body per recently seen object. Events of
    # one object arrive well within a second of each other; a later one simply starts a new worker.
    s.queueing.idle_timeout = 1.0


def make_registry(op: Settings, configuration: Any) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
        return _connection_info(configuration, settings)

    kopf.on.login(id="kubeconfig", registry=registry)(login)
    handlers.register(registry)
    if op.webhook:
        webhook.register(registry)
    return registry


async def run(
    op: Settings,
    *,
    kubeconfig: str | Path | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
) -> None:
    """Run the operator until `stop_flag` is set (or forever)."""
    configuration = load_configuration(kubeconfig)
    kube = Kube(configuration, pool_size=op.max_workers + 4)
    reconciler = Reconciler(kube, op)
    kopf_settings = kopf.OperatorSettings()
    metrics_server = None
    with tempfile.TemporaryDirectory(prefix="kubetune-webhook-") as cert_dir:
        configure(kopf_settings, op, Path(cert_dir))
        if op.metrics_port:
            metrics_server = metrics.serve(op.metrics_port, op.metrics_addr)
        liveness = f"http://{_url_host(op.health_addr)}:{op.health_port}/healthz" if op.health_port else None
        try:
            await kopf.operator(
                registry=make_registry(op, configuration),
                settings=kopf_settings,
                memo=kopf.Memo(reconciler=reconciler, kube=kube, settings=op),
                clusterwide=not op.namespaces,
                namespaces=list(op.namespaces),
                standalone=op.peering is None,
                peering_name=op.peering,
                priority=op.peering_priority if op.peering is not None else None,
                liveness_endpoint=liveness,
                stop_flag=stop_flag,
                ready_flag=ready_flag,
            )
        finally:
            reconciler.close()  # pending serving retries
            if metrics_server is not None:
                metrics_server.shutdown()
            kube.close()


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_operator", description="The kubetune operator.")
    parser.add_argument("--kubeconfig", help="kubeconfig to use (default: in-cluster, else $KUBECONFIG)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level (default: info)"
    )
    parser.add_argument("--verbose", action="store_true", help="same as --log-level=debug")
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    op = Settings.from_env()
    asyncio.run(run(op, kubeconfig=args.kubeconfig))
    return 0
