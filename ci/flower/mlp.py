"""The task both federations run, in numpy: the shipped MNIST digits and the
zoo's MLP (models/mlp.onnx: 784-200-200-10, ReLU, PyTorch's Gemm layout
with weights stored [out, in]), trained the way a fedge device trains it
(runtime/engine: softmax cross-entropy averaged over the batch, SGD with
momentum, a fresh shuffle every epoch, the last partial batch dropped,
momentum starting at zero every round).

Nothing here imports Flower: the Flower client and the comparison driver
both use it, and it runs on numpy alone.
"""

import gzip
import struct

import numpy as np

# The MLP's parameters in the model's canonical order (the ONNX
# initializers' names).
NAMES = [
    "fc1.weight", "fc1.bias",
    "fc2.weight", "fc2.bias",
    "fc3.weight", "fc3.bias",
]
SHAPES = {
    "fc1.weight": (200, 784), "fc1.bias": (200,),
    "fc2.weight": (200, 200), "fc2.bias": (200,),
    "fc3.weight": (10, 200), "fc3.bias": (10,),
}


def load_mnist(data_dir):
    """All 10,000 shipped digits: pixels as float32 in [0, 1] (value/255,
    as fedge's loader), labels as int64."""
    with gzip.open(f"{data_dir}/images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    assert magic == 0x803 and rows == 28 and cols == 28, "not an IDX image file"
    x = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows * cols)
    with gzip.open(f"{data_dir}/labels-idx1-ubyte.gz", "rb") as f:
        raw = f.read()
    magic, m = struct.unpack(">II", raw[:8])
    assert magic == 0x801 and m == n, "labels do not match the images"
    y = np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)
    return x.astype(np.float32) / 255.0, y


def _varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf):
    """(field number, wire type, value) of a protobuf message; a
    length-delimited value is its bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire} not expected in ONNX")
        yield field, wire, value


def _tensor(buf):
    """An ONNX TensorProto of float32: (name, array)."""
    dims, name, raw, floats, dtype = [], None, None, None, 1
    for field, wire, value in _fields(buf):
        if field == 1:  # dims, packed or not
            if wire == 2:
                j = 0
                while j < len(value):
                    d, j = _varint(value, j)
                    dims.append(d)
            else:
                dims.append(value)
        elif field == 2:
            dtype = value
        elif field == 4:  # float_data, packed
            floats = np.frombuffer(value, dtype="<f4")
        elif field == 8:
            name = value.decode()
        elif field == 9:
            raw = np.frombuffer(value, dtype="<f4")
    if dtype != 1:
        raise ValueError(f"initializer {name}: data type {dtype}, not float32")
    data = raw if raw is not None else floats
    return name, np.array(data, dtype=np.float32).reshape(dims)


def load_onnx_mlp(path):
    """The MLP's initial parameters, in NAMES order, read from the ONNX
    file's initializers (ModelProto.graph = 7, GraphProto.initializer = 5)."""
    with open(path, "rb") as f:
        model = f.read()
    graph = next(v for f, _, v in _fields(model) if f == 7)
    inits = dict(_tensor(v) for f, _, v in _fields(graph) if f == 5)
    params = [inits[n] for n in NAMES]
    for n, p in zip(NAMES, params):
        assert p.shape == SHAPES[n], f"{n}: shape {p.shape}, expected {SHAPES[n]}"
    return params


def forward(params, x):
    """Logits, and the hidden activations the backward pass needs."""
    w1, b1, w2, b2, w3, b3 = params
    h1 = np.maximum(x @ w1.T + b1, 0.0)
    h2 = np.maximum(h1 @ w2.T + b2, 0.0)
    return h2 @ w3.T + b3, (h1, h2)


def gradients(params, x, y):
    """Mean softmax cross-entropy over the batch and its gradients."""
    w1, _, w2, _, w3, _ = params
    logits, (h1, h2) = forward(params, x)
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = x.shape[0]
    loss = float(-np.log(p[np.arange(n), y] + 1e-12).mean())
    d3 = p
    d3[np.arange(n), y] -= 1.0
    d3 /= n
    d2 = (d3 @ w3) * (h2 > 0)
    d1 = (d2 @ w2) * (h1 > 0)
    grads = [
        d1.T @ x, d1.sum(axis=0),
        d2.T @ h1, d2.sum(axis=0),
        d3.T @ h2, d3.sum(axis=0),
    ]
    return loss, grads


def train(params, x, y, epochs, batch, lr, momentum, seed):
    """Local SGD with momentum from `params`; returns the new parameters,
    the samples seen per epoch and the mean loss of the last epoch."""
    params = [p.copy() for p in params]
    velocity = [np.zeros_like(p) for p in params]
    rng = np.random.default_rng(seed)
    steps = len(x) // batch
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(x))
        losses = []
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            loss, grads = gradients(params, x[idx], y[idx])
            losses.append(loss)
            for p, v, g in zip(params, velocity, grads):
                v *= momentum
                v += g
                p -= lr * v
    return params, steps * batch, float(np.mean(losses)) if losses else 0.0


def accuracy(params, x, y):
    logits, _ = forward(params, x)
    return float((logits.argmax(axis=1) == y).mean())
