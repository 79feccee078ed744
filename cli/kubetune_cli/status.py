"""`kubetune status NAME [-n NS] [--watch]`: a FineTuneJob's state, progress, metrics, conditions, endpoint.

Everything comes from the job's status (the operator's conditions, the trainer's progress, data statistics,
checkpoints, evaluation and model) plus, in a `kubetune dev` cluster, the local URL the development runtime
put on the inference Service (annotation kubetune.io/local-url), since the Service's cluster DNS name does not
resolve on the host. Once training has ended, the latest attempt's driver log kept in S3 (<run>/history/,
`kubetune.runlog`) is named with its exit code: it outlives the RayCluster (`kubetune logs NAME` prints it),
and the job's last Events are shown from the history ConfigMap the operator wrote when it ended (they
outlive the Events' one-hour TTL; kubetune_operator.history).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, cast

from kubetune_cli.progress_view import fmt_num, fmt_seconds

LOCAL_URL_ANNOTATION = "kubetune.io/local-url"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status", help="show a FineTuneJob's progress, metrics, conditions and endpoint", description=__doc__
    )
    p.add_argument("name", help="FineTuneJob name")
    p.add_argument("-n", "--namespace", default=None, help="namespace (default: the kubeconfig's)")
    p.add_argument("-w", "--watch", action="store_true", help="keep showing changes until the job ends")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text", help="text or the raw status as JSON")
    p.set_defaults(func=run)


def local_url(conn: Any, namespace: str, job_name: str) -> str | None:
    """The URL the dev runtime serves the job's model at on this machine, if any."""
    services = conn.get(f"/api/v1/namespaces/{namespace}/services?labelSelector=kubetune.io/job%3D{job_name}") or {}
    for svc in services.get("items") or []:
        url = ((svc.get("metadata") or {}).get("annotations") or {}).get(LOCAL_URL_ANNOTATION)
        if url:
            return cast(str, url)
    return None


def local_endpoint(local: str, endpoint_url: str | None) -> str:
    """The Service's local address plus the endpoint's path (the OpenAI base URL ends in /v1)."""
    from urllib.parse import urlsplit

    path = urlsplit(endpoint_url).path if endpoint_url else ""
    return local.rstrip("/") + path


def render(
    job: dict[str, Any],
    local: str | None = None,
    history: str | None = None,
    events: list[dict[str, Any]] | None = None,
) -> str:
    meta, st = job["metadata"], job.get("status") or {}
    lines = [f"{meta['namespace']}/{meta['name']}: {st.get('state') or 'Pending'}"]
    p = st.get("progress") or {}
    if p:
        lines.append(
            f"  progress  step {p.get('step', '-')}/{p.get('totalSteps', '-')} ({p.get('percent', 0)}%)  "
            f"loss {fmt_num(p.get('loss'))}  eval {fmt_num(p.get('evalLoss'))}  "
            f"{fmt_num(p.get('tokensPerSecond'), 0)} tok/s  ETA {fmt_seconds(p.get('etaSeconds'))}  "
            f"epoch {fmt_num(p.get('epoch'), 2)}  (at {p.get('updatedAt', '-')})"
            + (f"  trial {p['trial']}" if p.get("trial") else "")
        )
    d = st.get("data") or {}
    if d:
        lines.append(
            f"  data      {d.get('records', '-')} records, {d.get('trainRecords', '-')} train / "
            f"{d.get('validationRecords', '-')} held out, {d.get('duplicatesRemoved', 0)} duplicates, "
            f"{d.get('invalidRecords', 0)} invalid, {d.get('tokens', '-')} tokens"
        )
    ev = st.get("evaluation") or {}
    if ev:
        lines.append(
            f"  eval      {ev.get('metric', 'evalLoss')}: base {fmt_num(ev.get('base'))} -> fine-tuned "
            f"{fmt_num(ev.get('fineTuned'))} (improvement {fmt_num(ev.get('improvement'))})"
            + (f"  report {ev['reportUri']}" if ev.get("reportUri") else "")
        )
    lines.extend(render_trials(st))
    for c in st.get("checkpoints") or []:
        lines.append(f"  checkpoint step {c.get('step')}: {c.get('uri')} (evalLoss {fmt_num(c.get('evalLoss'))})")
    if st.get("model"):
        lines.append(f"  model     {st['model'].get('uri')} ({st['model'].get('kind')})")
    rj = st.get("rayJob") or {}
    if rj:
        lines.append(
            f"  rayJob    {rj.get('name')} job {rj.get('jobId', '-')} "
            f"({rj.get('jobDeploymentStatus', '-')}/{rj.get('jobStatus', '-')})"
        )
    ep = st.get("endpoint") or {}
    if ep:
        lines.append(f"  endpoint  {ep.get('url')} model {ep.get('model')}")
    if local:
        lines.append(
            f"  local     {local_endpoint(local, ep.get('url'))} (served on this machine by the kubetune dev runtime)"
        )
    if history:
        lines.append(f"  history   {history}")
    if st.get("conditions"):
        lines.append("  conditions:")
        for c in st["conditions"]:
            lines.append(f"    {c['type']:<10} {c['status']:<7} {c.get('reason', ''):<22} {c.get('message', '')}")
    if events:
        lines.append(f"  events (kept when the run ended, last {min(len(events), MAX_EVENT_LINES)}):")
        for e in events[-MAX_EVENT_LINES:]:
            lines.append(
                f"    {e.get('lastTimestamp') or '-':<20} {e.get('type') or '':<7} {e.get('reason') or '':<22} "
                f"{e.get('message') or ''}"
            )
    return "\n".join(lines)


MAX_EVENT_LINES = 10


def kept_events(conn: Any, job: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The Events the operator kept in the job's history ConfigMap when it ended (None: none kept)."""
    from kubetune_operator.history import EVENTS_KEY, config_map_name

    meta = job["metadata"]
    cm = conn.get(f"/api/v1/namespaces/{meta['namespace']}/configmaps/{config_map_name(meta['name'])}")
    try:
        return list(json.loads(((cm or {}).get("data") or {})[EVENTS_KEY]))
    except (KeyError, ValueError, TypeError):
        return None


# Deployed=False reasons that mean serving is still on its way (kubetune_operator.conditions).
_SERVING_IN_PROGRESS = ("Progressing", "AwaitingEvaluation", "ServingError")


MAX_TRIAL_LINES = 20


def render_trials(st: dict[str, Any]) -> list[str]:
    """status.trials as a table (best first marked), at most MAX_TRIAL_LINES rows."""
    trials = st.get("trials") or []
    if not trials:
        return []
    best = st.get("bestTrial")
    states: dict[str, int] = {}
    for t in trials:
        states[t.get("state", "?")] = states.get(t.get("state", "?"), 0) + 1
    summary = ", ".join(f"{n} {s.lower().replace('_', ' ')}" for s, n in sorted(states.items()))
    metric = (st.get("evaluation") or {}).get("metric") or "objective"
    lines = [f"  trials    {len(trials)} ({summary})" + (f"; best {best}" if best else "")]
    for t in trials[:MAX_TRIAL_LINES]:
        params = " ".join(
            f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
            for k, v in sorted((t.get("params") or {}).items())
        )
        mark = "  <- best" if t.get("id") == best else ""
        lines.append(
            f"    {t.get('id', '?'):<10} {t.get('state', '?'):<13} step {str(t.get('step', '-')):<6} "
            f"{metric} {fmt_num(t.get('objective'))}  {params}{mark}"
        )
    if len(trials) > MAX_TRIAL_LINES:
        lines.append(f"    ... {len(trials) - MAX_TRIAL_LINES} more (kubetune status -o json)")
    return lines


def finished(job: dict[str, Any]) -> bool:
    """Whether --watch can stop: failed, or succeeded and serving settled (available, off, or stuck)."""
    conds = {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []}
    if conds.get("Failed", {}).get("status") == "True":
        return True
    if conds.get("Succeeded", {}).get("status") != "True":
        return False
    enabled = ((job.get("spec") or {}).get("deploy") or {}).get("enabled", True)
    deployed = conds.get("Deployed")
    if deployed is None:
        return not enabled
    return deployed.get("status") == "True" or deployed.get("reason") not in _SERVING_IN_PROGRESS


def history_line(conn: Any, job: dict[str, Any]) -> str | None:
    """The latest attempt's driver log in S3 and its exit, once training ended (None before, or unreadable)."""
    conds = {c.get("type"): c.get("status") for c in (job.get("status") or {}).get("conditions") or []}
    if "True" not in (conds.get("Succeeded"), conds.get("Failed")):
        return None
    from kubetune_cli.errors import CLIError
    from kubetune_cli.logs import latest_history

    try:
        found = latest_history(conn, job)
    except (CLIError, ValueError, OSError):
        return None  # S3 unreachable or keys unreadable: the status itself still shows
    if found is None:
        return None
    folder, _, record = found
    record = record or {}
    return (
        f"{folder}/driver.log (driver exit code {record.get('exitCode', '?')}, ended "
        f"{record.get('endTime', '?')}; kubetune logs {job['metadata']['name']})"
    )


def run(args: argparse.Namespace) -> int:
    from kubetune_cli import cluster

    with cluster.connect() as conn:
        last = None
        while True:
            job = conn.get_job(args.name, args.namespace)
            if args.output == "json":
                text = json.dumps(job.get("status") or {}, indent=2)
            else:
                text = render(
                    job,
                    local_url(conn, job["metadata"]["namespace"], args.name),
                    history_line(conn, job),
                    kept_events(conn, job),
                )
            if text != last:
                print(text + ("\n" if args.watch else ""), flush=True)
                last = text
            if not args.watch or finished(job):
                return 0
            time.sleep(2)
