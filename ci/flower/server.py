"""Flower's server for the comparison: `flwr.server.start_server` (Flower's
gRPC server, one process: the Fleet transport, the client manager and the
strategy) running FedAvg over the MLP.

FedAvg samples `--per-round` of the `--clients` connected clients each
round and waits for all of them to be connected before round 1
(min_available_clients), weights results by their example counts, and
runs no evaluation (neither federated nor centralised: fedge's serve
does neither here). The aggregated parameters of the last round are
written to `--final` (an .npz) for the driver to evaluate after the run,
so the server does no extra work per round.

Started by compare.py inside the pinned virtual environment.
"""

import argparse
import pathlib
import sys

import flwr as fl
import numpy as np
from flwr.common import parameters_to_ndarrays

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import mlp  # noqa: E402


class SaveFinal(fl.server.strategy.FedAvg):
    """FedAvg that writes the model of round `last` to `path`."""

    def __init__(self, *, last, path, **kw):
        super().__init__(**kw)
        self.last, self.path = last, path

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if server_round == self.last and params is not None:
            np.savez(self.path, *parameters_to_ndarrays(params))
        return params, metrics


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", required=True, help="host:port to listen on")
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--per-round", type=int, required=True)
    ap.add_argument("--model", required=True, help="the MLP's ONNX file (initial weights)")
    ap.add_argument("--final", required=True, help="where to write the last round's model (.npz)")
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--momentum", type=float, required=True)
    ap.add_argument("--certs", help="directory with ca.pem, server.pem, server.key (TLS); none: plaintext")
    a = ap.parse_args()

    plan = {"epochs": a.epochs, "batch": a.batch, "lr": a.lr, "momentum": a.momentum}
    strategy = SaveFinal(
        last=a.rounds,
        path=a.final,
        fraction_fit=a.per_round / a.clients,
        min_fit_clients=a.per_round,
        min_available_clients=a.clients,
        fraction_evaluate=0.0,
        min_evaluate_clients=0,
        initial_parameters=fl.common.ndarrays_to_parameters(mlp.load_onnx_mlp(a.model)),
        on_fit_config_fn=lambda server_round: dict(plan, round=server_round),
    )
    certificates = None
    if a.certs:
        d = pathlib.Path(a.certs)
        certificates = tuple((d / n).read_bytes() for n in ("ca.pem", "server.pem", "server.key"))
    fl.server.start_server(
        server_address=a.address,
        config=fl.server.ServerConfig(num_rounds=a.rounds, round_timeout=300),
        strategy=strategy,
        certificates=certificates,
    )


if __name__ == "__main__":
    main()
