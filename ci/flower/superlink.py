"""Flower's current deployment (compare.py --flower-mode superlink): a
`flower-superlink` (Fleet, Control and runtime APIs over HTTP), which
starts a `flower-superexec` that starts the run's `flwr-serverapp`; one
`flower-supernode` per device, each with its own SuperExec starting
`flwr-clientapp` processes; the run submitted with `flwr run` (the Flower
App in app/). Plaintext HTTP on loopback (`--insecure`).

The server is the SuperLink's process tree (SuperLink, SuperExec,
ServerApp): its CPU and summed RSS are sampled every 100 ms from /proc
(a reaped child's CPU counts in its parent's), and the ServerApp writes
the wall-clock time of each round's start and end, where the sampled CPU
is read. The SuperLink keeps serving after the run, so "whole run" ends
when `flwr run` returns.
"""

import os
import pathlib
import shutil
import sys
import time

import mlp
import procs

HERE = pathlib.Path(__file__).resolve().parent


def _wait_line(proc, log, text, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.running():
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise SystemExit(f"{proc.argv[0]} did not print {text!r}; see {log}")


def run_superlink(a, work, fleet, free_port):
    """Runs the task on Flower's SuperLink; the server's figures (the
    SuperLink's process tree) as compare.py's other runs report them."""
    work.mkdir(parents=True)
    app = work / "app"
    shutil.copytree(HERE / "app", app)
    shutil.copy(HERE / "mlp.py", app / "fcapp" / "mlp.py")
    home = work / "home"
    home.mkdir()
    port = free_port()
    bindir = str(pathlib.Path(sys.executable).parent)
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "compare"\n\n[superlink.compare]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')

    t_start = time.time()
    link = fleet.start([f"{bindir}/flower-superlink", "--insecure", "--host", "127.0.0.1",
                        "--port", str(port), "--disable-runtime-dependency-installation"],
                       work / "superlink.log", env=env, group=True)
    sampler = procs.TreeSampler([link.pid])
    _wait_line(link, work / "superlink.log", "Uvicorn running on", 120)
    sampler.sample()
    ready = sampler.series[link.pid][-1]

    cenv = dict(env, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    nodes = []
    for i in range(a.clients):
        nodes.append(fleet.start(
            [f"{bindir}/flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
             "--host", "127.0.0.1", "--port", str(free_port()),
             "--node-config", f"partition-id={i}"],
            work / f"supernode{i}.log", env=cenv, group=True))
    time.sleep(3)
    dead = [i for i, n in enumerate(nodes) if not n.running()]
    if dead:
        raise SystemExit(f"SuperNodes {dead} exited at start; see {work}/supernode{dead[0]}.log")
    sampler.roots += [n.pid for n in nodes]
    sampler.series.update({n.pid: [] for n in nodes})
    # The SuperNodes poll the SuperLink whether or not a run is going: with
    # --superlink-idle-s, its CPU per second while they are connected and
    # no run is submitted (after 5 s for them to register).
    idle = None
    if a.superlink_idle_s > 0:
        time.sleep(5)
        sampler.sample()
        idle0 = sampler.series[link.pid][-1]
        time.sleep(a.superlink_idle_s)
        sampler.sample()
        idle1 = sampler.series[link.pid][-1]
        idle = round((idle1[1] - idle0[1]) / (idle1[0] - idle0[0]), 4)

    marks, final = work / "marks.txt", work / "final.npz"
    cfg = {"rounds": a.rounds, "clients": a.clients, "per-round": a.per_round,
           "per-client": a.per_client, "epochs": a.local_epochs, "batch": a.batch,
           "lr": a.lr, "momentum": a.momentum, "model": str(a.model), "data": str(a.data),
           "final": str(final), "marks": str(marks)}
    run_config = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in cfg.items())
    run = fleet.start([f"{bindir}/flwr", "run", str(app), "compare", "--stream",
                       "--run-config", run_config], work / "flwr-run.log", env=env)
    ok = run.wait(max(1.0, a.timeout_s))
    sampler.sample()
    sampler.stop()
    end = sampler.series[link.pid][-1]
    fleet.stop_all()
    if not ok:
        raise SystemExit(f"Flower (SuperLink): the run did not finish in {a.timeout_s} s")

    starts, ends = {}, {}
    if marks.exists():
        for line in marks.read_text().splitlines():
            what, k, t = line.split()
            (starts if what == "start" else ends)[int(k)] = float(t)
    rounds = sorted(ends)
    out = {
        "exit_code": run.status,
        "wall_s": round(end[0] - t_start, 3),
        "cpu_total_s": round(end[1], 3),
        "cpu_at_ready_s": round(ready[1], 3),
        "rss_at_ready_mib": round(ready[2] / 1024, 1),
        "peak_rss_mib": round(max(s[2] for s in sampler.series[link.pid]) / 1024, 1),
        "rounds_completed": len(rounds),
        "processes": "superlink + superexec + serverapp (summed, sampled every 100 ms)",
        "cpu_idle_per_s": idle,
    }
    if rounds:
        c0 = sampler.cpu_at(link.pid, starts[1])
        c1 = sampler.cpu_at(link.pid, ends[rounds[-1]])
        if c0 is not None and c1 is not None:
            out["rounds_wall_s"] = round(ends[rounds[-1]] - starts[1], 3)
            out["cpu_rounds_s"] = round(c1 - c0, 3)
            out["cpu_per_round_s"] = round((c1 - c0) / len(rounds), 4)
            out["cpu_after_rounds_s"] = round(end[1] - c1, 3)
        c_first = sampler.cpu_at(link.pid, ends[rounds[0]])
        if len(rounds) >= 2 and c_first is not None and c1 is not None:
            out["cpu_per_round_steady_s"] = round((c1 - c_first) / (len(rounds) - 1), 4)
    out["cpu_total_per_round_s"] = round(out["cpu_total_s"] / max(1, a.rounds), 4)
    dev = [sampler.series[n.pid] for n in nodes if sampler.series[n.pid]]
    out["devices"] = {
        "sampled": len(dev),
        "cpu_total_s": round(sum(s[-1][1] for s in dev), 2),
        "peak_rss_mean_mib": round(sum(max(x[2] for x in s) for s in dev) / max(1, len(dev)) / 1024, 1),
        "processes": "supernode + superexec + clientapps, each tree summed",
    }
    if final.exists():
        with mlp.np.load(final) as z:
            params = [z[f"arr_{i}"] for i in range(len(mlp.NAMES))]
        x, y = mlp.load_mnist(a.data)
        out["final_accuracy"] = round(mlp.accuracy(params, x[8000:10000], y[8000:10000]), 4)
    out["tls"] = False
    return out
