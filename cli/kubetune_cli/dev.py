"""`kubetune dev up|down|status`: a local development cluster (a development tool, not for production).

    kubetune dev up                 # control plane, CRDs, S3, operator, and the local runtime
    export KUBECONFIG=~/.cache/kubetune/dev/kubeconfig
    kubectl apply -f examples/quickstart.yaml
    kubectl get ftj -w
    kubetune status quickstart      # progress, metrics, conditions, and the local URL of the endpoint
    kubetune dev down

The local runtime plays KubeRay (each RayJob runs on a local Ray cluster) and the kubelet (each inference
Deployment's vLLM server runs as a local process on 127.0.0.1); see kubetune_cli.localenv.dev_runtime.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_cli.errors import EXIT_ENVIRONMENT, EXIT_FAILED, CLIError

if TYPE_CHECKING:
    from kubetune_cli.localenv.devenv import DevEnv


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dev",
        help="a local development cluster: up, down, status",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dev_sub = p.add_subparsers(dest="dev_command", metavar="ACTION", required=True)
    for name, help_ in (
        ("up", "start the dev cluster (or show the running one)"),
        ("down", "stop the dev cluster and everything it runs"),
        ("status", "show what the dev cluster runs"),
    ):
        q = dev_sub.add_parser(name, help=help_)
        q.add_argument(
            "--dir", type=Path, default=None, help="state folder (default $KUBETUNE_DEV_DIR or ~/.cache/kubetune/dev)"
        )
        if name == "up":
            q.add_argument("--s3-port", type=int, default=8333, help="port of the S3 endpoint (default 8333)")
            q.add_argument("--no-webhook", action="store_true", help="run the operator without its admission webhook")
            q.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
        if name == "status":
            q.add_argument("-o", "--output", choices=["text", "json"], default="text")
        q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kubetune_cli.localenv import devenv

    env = devenv.DevEnv(args.dir or devenv.default_dir())
    if args.dev_command == "up":
        print(f"kubetune dev: starting (state in {env.dir}; first start unpacks the Kubernetes binaries)", flush=True)
        try:
            st = env.up(s3_port=args.s3_port, webhook=not args.no_webhook, timeout=args.timeout)
        except devenv.DevEnvError as e:
            raise CLIError(str(e), EXIT_FAILED) from None
        print(_summary(st))
        return 0
    if args.dev_command == "down":
        print("kubetune dev: stopped" if env.down() else "kubetune dev: nothing was running")
        return 0
    st = env.state()
    if not env.running():
        if args.output == "json":
            print(json.dumps({"running": False}))
        else:
            print(f"kubetune dev is not running (state folder {env.dir})")
        return EXIT_ENVIRONMENT
    if args.output == "json":
        print(json.dumps({"running": True, **st}, indent=2))
    else:
        print(_summary(st, header="kubetune dev is running"))
        print(_jobs(env))
    return 0


def _summary(st: dict[str, Any], header: str = "kubetune dev is up") -> str:
    s3 = st.get("s3") or {}
    return "\n".join(
        [
            f"{header} (pid {st.get('pid')}, state in {st.get('dir')})",
            f"  export KUBECONFIG={st.get('kubeconfig')}",
            f"  API server  {st.get('server')}",
            f"  S3          {s3.get('endpoint')} (keys in Secret {s3.get('secret')})",
            f"  operator    pid {(st.get('operator') or {}).get('pid')}, metrics "
            f"{(st.get('operator') or {}).get('metrics')}",
            "  runtime     local Ray clusters for RayJobs, local vLLM servers for inference Deployments",
            "try:",
            "  kubectl apply -f examples/quickstart.yaml",
            "  kubectl get ftj -w",
            "  kubetune status quickstart",
            "  kubetune dev down",
        ]
    )


def _jobs(env: DevEnv) -> str:
    from kubetune import api
    from kubetune_cli.localenv.rest import Rest, RestError

    rest = Rest(env.kubeconfig)
    try:
        jobs = rest.items(f"/apis/{api.GROUP}/{api.VERSION}/{api.PLURAL}")
    except RestError as e:
        return f"  (cannot list FineTuneJobs: {e})"
    finally:
        rest.close()
    if not jobs:
        return "FineTuneJobs: none"
    lines = ["FineTuneJobs:"]
    for j in jobs:
        st = j.get("status") or {}
        p = st.get("progress") or {}
        lines.append(
            f"  {j['metadata']['namespace']}/{j['metadata']['name']}: {st.get('state', 'Pending')} "
            f"{p.get('percent', 0)}% {(st.get('endpoint') or {}).get('url') or ''}"
        )
    return "\n".join(lines)
