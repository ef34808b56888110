"""The ClientApp: trains the MLP in numpy on SuperNode `partition-id`'s
contiguous slice of the shipped digits (as client.py) and replies with
dense float32 weights and its example count."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fcapp import mlp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    c, cfg = context.run_config, msg.content["config"]
    i, n = int(context.node_config["partition-id"]), int(c["per-client"])
    x, y = mlp.load_mnist(c["data"])
    x, y = x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]
    params = [np.asarray(p, dtype=np.float32) for p in msg.content["arrays"].to_numpy_ndarrays()]
    new, _, loss = mlp.train(
        params, x, y, epochs=int(cfg["epochs"]), batch=int(cfg["batch"]),
        lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
        seed=i * 1_000_003 + int(cfg["server-round"]),
    )
    content = RecordDict({
        "arrays": ArrayRecord([p.astype(np.float32, copy=False) for p in new]),
        "metrics": MetricRecord({"num-examples": len(x), "train_loss": loss}),
    })
    return Message(content=content, reply_to=msg)
