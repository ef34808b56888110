"""PyTorch's side of the training benchmark (issue 17).

The same models as `fedge-device bench` (runtime/engine/src/zoo.rs: the
McMahan MLP 784-200-200-10 and CNN), the same step (forward, softmax
cross-entropy, backward, SGD with momentum 0.9 at lr 0.01), the same batch
sizes and thread count, timed the same way: one warm-up step, then whole
steps for at least `--seconds`. Inputs are MNIST-shaped random tensors
(speed does not depend on the values). Writes JSON and prints one line per
configuration. Run it through ci/torch-bench.sh, which pins torch.
"""

import argparse
import json
import resource
import time

import torch
from torch import nn


def mlp():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 200), nn.ReLU(),
        nn.Linear(200, 200), nn.ReLU(),
        nn.Linear(200, 10),
    )


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )


def bench(name, make, batch, seconds):
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    batches = [
        (torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,)))
        for _ in range(8)
    ]

    def step(i):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    step(0)  # warm-up
    start = time.perf_counter()
    steps = 0
    while time.perf_counter() - start < seconds or steps < 3:
        step(steps + 1)
        steps += 1
    secs = time.perf_counter() - start
    return {
        "model": name,
        "batch": batch,
        "steps": steps,
        "samples_per_s": steps * batch / secs,
        "step_ms": secs * 1e3 / steps,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench-torch.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for name, make in [("cnn", cnn), ("mlp", mlp)]:
        for batch in [32, 64]:
            r = bench(name, make, batch, a.seconds)
            print(f"{name:<4} batch {batch:>3}: {r['samples_per_s']:>9.1f} samples/s "
                  f"({r['step_ms']:.2f} ms/step)", flush=True)
            rows.append(r)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.1f} MiB")
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": rows,
        "peak_rss_mib": rss,
    }
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"report written to {a.out}")


if __name__ == "__main__":
    main()
