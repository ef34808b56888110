"""A Flower client for the comparison: one process per device, connected to
Flower's gRPC server with `flwr.client.start_client`, training the MLP on
its own contiguous slice of the shipped MNIST digits in numpy (mlp.py:
the same step, batch, learning rate and momentum as a fedge device) and
returning dense float32 weights with its example count.

Started by compare.py inside the pinned virtual environment.
"""

import argparse
import pathlib
import sys

import flwr as fl
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mlp  # noqa: E402


class MlpClient(fl.client.NumPyClient):
    def __init__(self, x, y, seed):
        self.x, self.y, self.seed = x, y, seed

    def fit(self, parameters, config):
        params = [np.asarray(p, dtype=np.float32) for p in parameters]
        new, _, loss = mlp.train(
            params, self.x, self.y,
            epochs=int(config["epochs"]), batch=int(config["batch"]),
            lr=float(config["lr"]), momentum=float(config["momentum"]),
            seed=self.seed * 1_000_003 + int(config["round"]),
        )
        new = [p.astype(np.float32, copy=False) for p in new]
        return new, len(self.x), {"loss": loss}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True, help="host:port")
    ap.add_argument("--data", required=True, help="the MNIST directory (models/data/mnist-10k)")
    ap.add_argument("--range", required=True, help="START..END: this client's samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ca", help="the server's CA certificate (PEM); none: plaintext")
    a = ap.parse_args()

    start, end = (int(v) for v in a.range.split(".."))
    x, y = mlp.load_mnist(a.data)
    client = MlpClient(x[start:end].copy(), y[start:end].copy(), a.seed)
    root = pathlib.Path(a.ca).read_bytes() if a.ca else None
    fl.client.start_client(
        server_address=a.server,
        client=client.to_client(),
        root_certificates=root,
        insecure=root is None,
        max_retries=50,
        max_wait_time=120,
    )


if __name__ == "__main__":
    main()
