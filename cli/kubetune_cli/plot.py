"""`kubetune plot NAME`: loss curves (PNG) from a job's metrics.jsonl in S3; also used by `kubetune run`.

metrics.jsonl (written by the trainer next to the checkpoints, `<output.uri>/<namespace>/<name>/`) outlives
the cluster, so this works for finished and deleted jobs too: `--metrics` takes the file or its s3:// URI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kubetune_cli.errors import EXIT_USAGE, CLIError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plot", help="plot a job's loss curves from its metrics in S3", description=__doc__)
    p.add_argument("name", nargs="?", help="FineTuneJob name (read from the cluster KUBECONFIG points at)")
    p.add_argument("-n", "--namespace", default=None, help="namespace (default: the kubeconfig's)")
    p.add_argument("--metrics", help="a metrics.jsonl file or s3:// URI instead of a job in the cluster")
    p.add_argument("-o", "--output", help="PNG file to write (default: <name>-loss.png, <name>-trials.png)")
    p.add_argument(
        "--trials",
        action="store_true",
        help="a tuning job: every trial's held-out curve (from <run>/trials/<id>/metrics.jsonl)",
    )
    p.set_defaults(func=run)


def parse_metrics(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def loss_series(metrics: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) as (step, loss) points; a resumed run's later lines win for the same step."""
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for m in metrics:
        step = m.get("step")
        if not isinstance(step, int) or m.get("event"):
            continue
        if isinstance(m.get("loss"), (int, float)):
            train[step] = float(m["loss"])
        if isinstance(m.get("evalLoss"), (int, float)):
            evals[step] = float(m["evalLoss"])
    return sorted(train.items()), sorted(evals.items())


def plot_losses(metrics: list[dict[str, Any]], path: Path, title: str, baseline: float | None = None) -> Path:
    """Write the training and held-out loss curves to `path` (PNG); `baseline`: the base model's loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = loss_series(metrics)
    if not train and not evals:
        raise CLIError("no loss values in the metrics yet")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="training loss", color="tab:blue", lw=1.2)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="held-out loss", color="tab:orange")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", label=f"base model held-out loss ({baseline:.3f})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_trials(
    curves: dict[str, list[dict[str, Any]]],
    path: Path,
    title: str,
    *,
    best: str | None = None,
    states: dict[str, str] | None = None,
    baseline: float | None = None,
) -> Path:
    """Each tuning trial's held-out loss by step (training loss faint); the best trial bold, early-stopped
    trials end in an x. `curves`: trial id -> its metrics lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    states = states or {}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    drawn = 0
    for i, (tid, metrics) in enumerate(sorted(curves.items())):
        train, evals = loss_series(metrics)
        if not evals and not train:
            continue
        color = f"C{i % 10}"
        is_best = tid == best
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], color=color, lw=0.6, alpha=0.35)
        if evals:
            label = (
                f"{tid}"
                + (" (best)" if is_best else "")
                + (f" {states[tid].lower().replace('_', ' ')}" if states.get(tid) not in (None, "TERMINATED") else "")
            )
            ax.plot(
                [s for s, _ in evals],
                [v for _, v in evals],
                "o-",
                color=color,
                lw=2.5 if is_best else 1.2,
                ms=4,
                label=label,
            )
            if states.get(tid) == "EARLY_STOPPED":
                ax.plot([evals[-1][0]], [evals[-1][1]], "x", color=color, ms=10, mew=2)
        drawn += 1
    if not drawn:
        raise CLIError("no loss values in any trial's metrics yet")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", label=f"base model held-out loss ({baseline:.3f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss (training loss faint)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def trial_curves(
    job_metrics: list[dict[str, Any]], per_trial: dict[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """Each trial's metrics lines: its own metrics.jsonl (training loss; missing when Tune stopped the trial
    before it was written) plus the held-out figures the tuning driver logged for it (`trialResult` events in
    the job's metrics.jsonl, one per evaluation of every trial)."""
    curves = {tid: [{k: v for k, v in m.items() if k != "evalLoss"} for m in lines] for tid, lines in per_trial.items()}
    for m in job_metrics:
        if m.get("event") == "trialResult" and m.get("trial") and isinstance(m.get("step"), int):
            point = {"step": m["step"], "evalLoss": m.get("evalLoss")}
            curves.setdefault(m["trial"], []).append(point)
    return curves


def _run_trials(args: argparse.Namespace) -> int:
    from kubetune_cli import cluster

    if not args.name:
        raise CLIError("--trials needs a job NAME", EXIT_USAGE)
    with cluster.connect() as conn:
        job = conn.get_job(args.name, args.namespace)
        st = job.get("status") or {}
        trials = st.get("trials") or []
        if not trials:
            raise CLIError(f"{args.name} has no trials (no spec.tuning, or none started yet)")
        curves = trial_curves(
            parse_metrics(conn.read_run_object(job, "metrics.jsonl") or ""),
            {
                t["id"]: parse_metrics(conn.read_run_object(job, f"trials/{t['id']}/metrics.jsonl") or "")
                for t in trials
            },
        )
        evaluation = st.get("evaluation") or {}
        baseline = evaluation.get("base") if evaluation.get("metric") in (None, "evalLoss") else None
    out = Path(args.output or f"{args.name}-trials.png")
    plot_trials(
        curves,
        out,
        f"{job['metadata']['namespace']}/{args.name}: {len(trials)} trials",
        best=st.get("bestTrial"),
        states={t["id"]: t.get("state") for t in trials},
        baseline=baseline,
    )
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from kubetune_cli import cluster

    if getattr(args, "trials", False):
        return _run_trials(args)
    text: str | None  # None: the job has no metrics.jsonl yet
    if args.metrics:
        if args.metrics.startswith("s3://"):
            raise CLIError(
                "for an s3:// URI give the job NAME too (its endpoint and keys come from the job), "
                "or download the file",
                EXIT_USAGE,
            )
        text = Path(args.metrics).read_text()
        title = args.name or Path(args.metrics).parent.name
        baseline = None
    elif args.name:
        with cluster.connect() as conn:
            job = conn.get_job(args.name, args.namespace)
            text = conn.read_run_object(job, "metrics.jsonl")
            evaluation = (job.get("status") or {}).get("evaluation") or {}
            baseline = evaluation.get("base") if evaluation.get("metric") in (None, "evalLoss") else None
        if text is None:
            raise CLIError(f"no metrics.jsonl for {args.name} yet (the trainer writes it every 30 s)")
        title = f"{job['metadata']['namespace']}/{args.name}"
    else:
        raise CLIError("give a job NAME or --metrics FILE", EXIT_USAGE)
    out = Path(args.output or f"{args.name or 'metrics'}-loss.png")
    plot_losses(parse_metrics(text), out, title, baseline)
    print(f"wrote {out}")
    return 0
