"""Aggregator CPU and peak memory: Flower's server against fedge's, on one task.

The task: the zoo's MNIST MLP (784-200-200-10), `--clients` device
processes (20) each holding a contiguous slice of `--per-client` (400)
of the shipped digits 0..8000 (the slicing ci/tree.sh uses), FedAvg
weighted by sample counts with `--per-round` (10) devices sampled per
round, dense float32 updates, `--rounds` (20) rounds, `--local-epochs`
(2) of SGD (batch 32, lr 0.05, momentum 0.9) per round, everything over
loopback.

- Flower, `--flower-mode start_server`: `flwr.server.start_server`
  (server.py; gRPC, TLS unless --flower-insecure) and one
  `flwr.client.start_client` process per device (client.py; training in
  numpy).
- Flower, `--flower-mode superlink`: Flower's current deployment, a
  SuperLink with its SuperExec and ServerApp processes and one SuperNode
  per device (superlink.py; the Flower App in app/; plaintext HTTP).
- fedge: `fedge-aggregator serve` (QUIC, TLS 1.3, signed updates, SQLite
  state) and one `fedge-device run` process per device (tract).

Measured for each server process: CPU (user + system, every thread) from
wait4 when it exits; peak RSS (VmHWM) read every 50 ms until it exits; CPU
and RSS read from /proc at its log's round markers (ready, each round's
start and end), so that start-up and the finish can be told apart from
the rounds; wall time; rounds completed. Both final models are evaluated on the held-out digits
8000..10000 afterwards (outside the measured processes). Devices' CPU is
reported too. Writes JSON (`--out`) and prints a table.

Run through ci/flower-compare.sh, which pins flwr and builds fedge.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mlp  # noqa: E402
import procs  # noqa: E402
import superlink  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent


class Marks:
    """CPU time, RSS and time of one server process at named moments (log
    lines), and the rounds its log reports."""

    def __init__(self):
        self.at = {}
        self.round_ends = []  # (round, t, cpu_s)

    def mark(self, proc, name):
        if name not in self.at:
            self.at[name] = (time.monotonic(), proc.cpu_s(), proc.rss_kib())

    def round_end(self, proc, round_id):
        self.round_ends.append((round_id, time.monotonic(), proc.cpu_s()))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(d):
    """A CA and a server certificate for 127.0.0.1/localhost (Flower's TLS)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "compare CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(cert.public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))


def summarize(server, marks, rounds, devices):
    """The server's figures, and the devices' CPU."""
    out = server.totals()
    ready = marks.at.get("ready")
    first = marks.at.get("first_round")
    ends = sorted(marks.round_ends)
    out["rounds_completed"] = len(ends)
    if ready:
        out["cpu_at_ready_s"] = round(ready[1], 3)
        out["rss_at_ready_mib"] = round(ready[2] / 1024, 1)
    if first and ends:
        out["rounds_wall_s"] = round(ends[-1][1] - first[0], 3)
        out["cpu_rounds_s"] = round(ends[-1][2] - first[1], 3)
        out["cpu_per_round_s"] = round((ends[-1][2] - first[1]) / len(ends), 4)
        out["cpu_after_rounds_s"] = round(out["cpu_total_s"] - ends[-1][2], 3)
    if len(ends) >= 2:
        # Rounds 2..N: no start-up, no first connections.
        out["cpu_per_round_steady_s"] = round((ends[-1][2] - ends[0][2]) / (len(ends) - 1), 4)
    out["cpu_total_per_round_s"] = round(out["cpu_total_s"] / max(1, rounds), 4)
    done = [d for d in devices if d.rusage is not None]
    dev_cpu = [d.rusage.ru_utime + d.rusage.ru_stime for d in done]
    dev_rss = [d.hwm_kib / 1024 for d in done]
    out["devices"] = {
        "exited": len(done),
        "exit_codes_nonzero": sum(1 for d in done if d.status != 0),
        "cpu_total_s": round(sum(dev_cpu), 2),
        "peak_rss_mean_mib": round(statistics.mean(dev_rss), 1) if dev_rss else None,
    }
    return out


def run_flower(a, work, fleet):
    work.mkdir(parents=True)
    port = free_port()
    certs = None
    if not a.flower_insecure:
        certs = work / "certs"
        certs.mkdir()
        make_certs(certs)
    marks = Marks()

    def on_line(p, line):
        if "gRPC server running" in line:
            marks.mark(p, "ready")
        m = re.search(r"\[ROUND (\d+)\]", line)
        if m:
            k = int(m.group(1))
            if k == 1:
                marks.mark(p, "first_round")
            else:
                marks.round_end(p, k - 1)
        elif "[SUMMARY]" in line:
            marks.round_end(p, a.rounds)

    # No telemetry requests (Flower sends usage events by default).
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLWR_TELEMETRY_ENABLED="0")
    argv = [sys.executable, str(HERE / "server.py"), "--address", f"127.0.0.1:{port}",
            "--rounds", str(a.rounds), "--clients", str(a.clients), "--per-round", str(a.per_round),
            "--model", str(a.model), "--final", str(work / "final.npz"),
            "--epochs", str(a.local_epochs), "--batch", str(a.batch), "--lr", str(a.lr),
            "--momentum", str(a.momentum)]
    if certs:
        argv += ["--certs", str(certs)]
    server = fleet.start(argv, work / "server.log", on_line=on_line, env=env)
    wait_for(lambda: "ready" in marks.at, server, 120, "Flower's server did not start")
    # One BLAS thread per client, as a fedge device trains with one thread.
    cenv = dict(env, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    devices = []
    for i in range(a.clients):
        argv = [sys.executable, str(HERE / "client.py"), "--server", f"127.0.0.1:{port}",
                "--data", str(a.data), "--range", f"{i * a.per_client}..{(i + 1) * a.per_client}",
                "--seed", str(i)]
        if certs:
            argv += ["--ca", str(certs / "ca.pem")]
        devices.append(fleet.start(argv, work / f"client{i}.log", env=cenv))
    finish(fleet, server, devices, a, "Flower")
    res = summarize(server, marks, a.rounds, devices)
    final = work / "final.npz"
    if final.exists():
        with mlp.np.load(final) as z:
            params = [z[f"arr_{i}"] for i in range(len(mlp.NAMES))]
        res["final_accuracy"] = round(mlp.accuracy(params, *held_out(a)), 4)
    res["tls"] = certs is not None
    return res


def held_out(a):
    x, y = mlp.load_mnist(a.data)
    return x[8000:10000], y[8000:10000]


def fedge_config(a):
    """Plain sample-weighted FedAvg over a closed fleet (as ci/tree.sh), dense
    float32 updates, exactly `per_round` devices selected per round."""
    return f"""i_know_this_is_unsafe = true
[rounds]
rounds = {a.rounds}
devices_per_round = {a.per_round}
min_devices = {a.per_round}
over_selection = 1.0
[plan]
local_epochs = {a.local_epochs}
batch_size = {a.batch}
learning_rate = {a.lr}
momentum = {a.momentum}
codec = "dense-f32"
error_feedback = false
[weights]
stake = {{ kind = "constant" }}
samples = {{ kind = "linear" }}
max_share = 1.0
allow_unknown = true
[strategy]
combine = {{ kind = "mean" }}
"""


def run_fedge(a, work, fleet):
    work.mkdir(parents=True)
    agg, dev = a.fedge_bin / "fedge-aggregator", a.fedge_bin / "fedge-device"
    subprocess.run([str(agg), "model", "import", str(a.model), "--out", str(work / "mlp.fedge")],
                   check=True, stdout=subprocess.DEVNULL, timeout=120)
    (work / "agg.toml").write_text(fedge_config(a))
    marks = Marks()
    seen = {}

    def on_line(p, line):
        for key in ("listening", "fingerprint"):
            if line.startswith(key + " "):
                seen[key] = line.split()[1]
        if "fingerprint" in seen:
            marks.mark(p, "ready")
        m = re.search(r"finished rounds=\d+ final_version=([0-9a-f]+)", line)
        if m:
            seen["final"] = m.group(1)
        m = re.search(r"round_id=(\d+)", line)
        if m and "round opened" in line and int(m.group(1)) == 1:
            marks.mark(p, "first_round")
        if m and "model published" in line:
            marks.round_end(p, int(m.group(1)))

    env = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
    server = fleet.start(
        [str(agg), "serve", "--config", str(work / "agg.toml"), "--listen", "127.0.0.1:0",
         "--state-dir", str(work / "agg"), "--model", str(work / "mlp.fedge")],
        work / "server.log", on_line=on_line, env=env)
    wait_for(lambda: "ready" in marks.at, server, 120, "fedge-aggregator did not start")
    denv = dict(os.environ, RUST_LOG="warn")
    devices = []
    for i in range(a.clients):
        devices.append(fleet.start(
            [str(dev), "run", "--aggregator", seen["listening"], "--pin", seen["fingerprint"],
             "--state-dir", str(work / f"dev{i}"), "--data", f"mnist:{a.data.parent}",
             "--range", f"{i * a.per_client}..{(i + 1) * a.per_client}", "--seed", str(i)],
            work / f"dev{i}.log", env=denv))
    finish(fleet, server, devices, a, "fedge")
    res = summarize(server, marks, a.rounds, devices)
    if "final" in seen:
        res["final_accuracy"] = fedge_accuracy(a, work / "agg" / "models" / f"{seen['final']}.fedge")
    res["tls"] = True
    return res


def fedge_accuracy(a, model):
    """Held-out accuracy as fedge's engine computes it (as ci/tree.sh)."""
    out = subprocess.run(
        [str(a.fedge_bin / "fedge-device"), "train", "--model", str(model),
         "--data", f"mnist:{a.data.parent}", "--epochs", "0", "--train", "0..32", "--test", "8000..10000"],
        check=True, capture_output=True, text=True, timeout=120).stdout
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "0":
            return float(f[3])
    return None


def wait_for(cond, server, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if not server.running() or time.monotonic() > deadline:
            raise SystemExit(f"{what}; see {server.argv[0]}'s log")
        time.sleep(0.05)


def finish(fleet, server, devices, a, name):
    deadline = server.started + a.timeout_s
    if not server.wait(max(0.0, deadline - time.monotonic())):
        fleet.stop_all()
        raise SystemExit(f"{name}: the server did not finish in {a.timeout_s} s")
    # Devices leave once the server is gone; give them a moment, then stop them.
    if not fleet.wait_all(devices, time.monotonic() + 30):
        print(f"{name}: devices still running 30 s after the server exited; stopping them",
              file=sys.stderr)
        for d in devices:
            d.stop()
    if server.status != 0:
        raise SystemExit(f"{name}: the server exited with {server.status}")


def machine():
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def median_runs(runs):
    """Per key, the median over repeated runs (numbers only)."""
    if len(runs) == 1:
        return runs[0]
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
            out[k] = round(statistics.median(vals), 4)
        else:
            out[k] = v
    return out


ROWS = [
    ("rounds completed", "rounds_completed", "{:.0f}"),
    ("server CPU, whole run (s)", "cpu_total_s", "{:.2f}"),
    ("  of which start-up, until ready (s)", "cpu_at_ready_s", "{:.2f}"),
    ("  of which after the last round (s)", "cpu_after_rounds_s", "{:.2f}"),
    ("server CPU per round, rounds 1..N (s)", "cpu_per_round_s", "{:.3f}"),
    ("server CPU per round, rounds 2..N (s)", "cpu_per_round_steady_s", "{:.3f}"),
    ("server CPU, whole run / rounds (s)", "cpu_total_per_round_s", "{:.3f}"),
    ("server CPU per second, devices connected, no run (s)", "cpu_idle_per_s", "{:.3f}"),
    ("server peak RSS (MiB)", "peak_rss_mib", "{:.1f}"),
    ("server RSS when ready (MiB)", "rss_at_ready_mib", "{:.1f}"),
    ("server wall, whole run (s)", "wall_s", "{:.1f}"),
    ("wall, round 1 start to last round end (s)", "rounds_wall_s", "{:.1f}"),
    ("final held-out accuracy", "final_accuracy", "{:.4f}"),
    ("devices' CPU, all together (s)", ("devices", "cpu_total_s"), "{:.1f}"),
    ("device peak RSS, mean (MiB)", ("devices", "peak_rss_mean_mib"), "{:.1f}"),
]


def table(res):
    cols = [k for k in ("flower", "flower_superlink", "fedge") if k in res]
    lines = [f"| metric | {' | '.join(res[k]['label'] for k in cols)} |",
             "|---|" + "---:|" * len(cols)]
    for label, key, fmt in ROWS:
        cells = []
        for k in cols:
            v = res[k]["median"]
            v = v.get(key[0], {}).get(key[1]) if isinstance(key, tuple) else v.get(key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--per-client", type=int, default=400, help="training digits per device")
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each, alternating; the table shows medians")
    ap.add_argument("--only", choices=["both", "flower", "fedge"], default="both")
    ap.add_argument("--flower-insecure", action="store_true",
                    help="start_server without TLS (fedge always has it; the SuperLink runs without)")
    ap.add_argument("--flower-mode", choices=["start_server", "superlink", "both"], default="both",
                    help="Flower's server: start_server (gRPC, one process), "
                    "the SuperLink deployment, or both")
    ap.add_argument("--superlink-idle-s", type=float, default=0,
                    help="SuperLink: seconds its CPU is measured with the SuperNodes "
                    "connected, before the run is submitted (0: not measured)")
    ap.add_argument("--fedge-bin", type=pathlib.Path, required=True, help="directory of the release binaries")
    ap.add_argument("--model", type=pathlib.Path, default=REPO / "models" / "mlp.onnx")
    # fedge's `--data mnist:DIR` reads DIR/mnist-10k: it is given the parent.
    ap.add_argument("--data", type=pathlib.Path, default=REPO / "models" / "data" / "mnist-10k",
                    help="the directory of the IDX files (named mnist-10k)")
    ap.add_argument("--timeout-s", type=float, default=900, help="per server run")
    ap.add_argument("--out", type=pathlib.Path, default=REPO / "results" / "flower-compare.json")
    ap.add_argument("--keep", type=pathlib.Path, help="keep the runs' logs and state in this directory")
    a = ap.parse_args()
    if a.clients * a.per_client > 8000:
        ap.error("--clients x --per-client must fit in the 8,000 training digits")
    if not 1 <= a.per_round <= a.clients:
        ap.error("--per-round must be in 1..--clients")

    import flwr
    x, y = held_out(a)
    initial = mlp.load_onnx_mlp(a.model)
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "task": {k: getattr(a, k) for k in ("rounds", "clients", "per_round", "per_client",
                                            "local_epochs", "batch", "lr", "momentum")},
        "initial_accuracy_numpy": round(mlp.accuracy(initial, x, y), 4),
    }
    res["task"]["model"] = "models/mlp.onnx (784-200-200-10)"
    if a.only in ("both", "fedge"):
        res["initial_accuracy_fedge"] = fedge_accuracy(a, a.model)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    kinds = {"flower": (run_flower, f"Flower {flwr.__version__} start_server"),
             "flower_superlink": (lambda a, w, f: superlink.run_superlink(a, w, f, free_port),
                                  f"Flower {flwr.__version__} SuperLink"),
             "fedge": (run_fedge, f"fedge {commit}")}
    flower = {"start_server": ["flower"], "superlink": ["flower_superlink"],
              "both": ["flower", "flower_superlink"]}[a.flower_mode]
    order = {"both": flower + ["fedge"], "flower": flower, "fedge": ["fedge"]}[a.only]
    root = a.keep or pathlib.Path(tempfile.mkdtemp(prefix="fedge-flower-"))
    fleet = procs.Fleet()
    try:
        for rep in range(a.repeat):
            for k in order:
                fn, label = kinds[k]
                print(f"== {label}: run {rep + 1} of {a.repeat}", file=sys.stderr, flush=True)
                r = fn(a, root / f"{k}-{rep}", fleet)
                print(json.dumps(r), file=sys.stderr, flush=True)
                entry = res.setdefault(k, {"label": label, "runs": []})
                entry["runs"].append(r)
    finally:
        fleet.stop_all()
        if not a.keep:
            subprocess.run(["rm", "-rf", str(root)])
    for k in order:
        res[k]["median"] = median_runs(res[k]["runs"])
    res["flwr_version"] = flwr.__version__
    res["fedge_commit"] = commit
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    print(f"\n{a.rounds} rounds, {a.clients} devices, {a.per_round} per round; "
          f"machine: {res['machine']['cpus']} CPUs ({res['machine']['cpu_model']}); "
          f"initial accuracy {res['initial_accuracy_numpy']} (numpy)"
          + (f", {res['initial_accuracy_fedge']} (fedge)" if "initial_accuracy_fedge" in res else "")
          + f"; JSON in {a.out}")


if __name__ == "__main__":
    main()
