"""The ServerApp: FedAvg (Flower's Message API) sampling `per-round` of
`clients` SuperNodes each round, after all of them have connected;
weighted by example counts; no evaluation. Writes the wall-clock time at
each round's start and end to `marks` (compare.py reads the server
processes' CPU there) and the final model to `final` (.npz)."""

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fcapp import mlp

app = ServerApp()


class MarkedFedAvg(FedAvg):
    def __init__(self, marks, **kw):
        super().__init__(**kw)
        self.marks = marks

    def _mark(self, what, server_round):
        with open(self.marks, "a") as f:
            f.write(f"{what} {server_round} {time.time():.6f}\n")

    def configure_train(self, server_round, arrays, config, grid):
        self._mark("start", server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        self._mark("end", server_round)
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    c = context.run_config
    strategy = MarkedFedAvg(
        c["marks"],
        fraction_train=int(c["per-round"]) / int(c["clients"]),
        fraction_evaluate=0.0,
        min_train_nodes=int(c["per-round"]),
        min_available_nodes=int(c["clients"]),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(mlp.load_onnx_mlp(c["model"])),
        num_rounds=int(c["rounds"]),
        train_config=ConfigRecord({k: c[k] for k in ("epochs", "batch", "lr", "momentum")}),
    )
    np.savez(c["final"], *result.arrays.to_numpy_ndarrays())
