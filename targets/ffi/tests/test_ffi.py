"""The fedge-ffi library through its generated Python bindings.

Run by tests/python.rs (part of `cargo test`), which generates the bindings
into a temporary directory, copies the cdylib next to them and sets
PYTHONPATH and FEDGE_MODELS_DIR. Uses the real zoo MLP (models/mlp.onnx)
and real MNIST digits (models/data/mnist-10k).
"""

import asyncio
import gzip
import math
import os
import struct
import tempfile
import unittest

from fedge_ffi import (
    Device,
    DeviceConfig,
    FedgeError,
    Samples,
    TrainOptions,
    verify_update,
    zoo_models,
)

MODELS = os.environ.get(
    "FEDGE_MODELS_DIR",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "models"),
)
MLP_PARAMETERS = 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10


def read_idx(path):
    """An IDX file of unsigned bytes (as runtime/engine/src/data.rs reads it)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    assert data[0] == 0 and data[1] == 0 and data[2] == 0x08, path
    rank = data[3]
    dims = struct.unpack(">" + "I" * rank, data[4 : 4 + 4 * rank])
    return dims, data[4 + 4 * rank :]


def mnist(start, end):
    """Samples start..end: pixels scaled to [0, 1] (flat) and labels."""
    d = os.path.join(MODELS, "data", "mnist-10k")
    (n, rows, cols), pixels = read_idx(os.path.join(d, "images-idx3-ubyte.gz"))
    (n_labels,), labels = read_idx(os.path.join(d, "labels-idx1-ubyte.gz"))
    assert n == n_labels == 10000 and rows == cols == 28
    k = rows * cols
    inputs = [p / 255.0 for p in pixels[start * k : end * k]]
    return Samples(inputs=inputs, labels=list(labels[start:end]))


def shakespeare_windows(start, count, context=32):
    """`count` windows of `context` characters of the shipped text from
    character `start` on, as token ids (the character model's vocabulary:
    the text's characters, sorted, as runtime/engine/src/data.rs builds
    it), each labelled with the character that follows."""
    with open(os.path.join(MODELS, "data", "tinyshakespeare", "input.txt")) as f:
        text = f.read()
    ids = {c: i for i, c in enumerate(sorted(set(text)))}
    tokens, labels = [], []
    for k in range(count):
        window = text[start + k : start + k + context + 1]
        tokens.extend(ids[c] for c in window[:context])
        labels.append(ids[window[context]])
    return Samples(inputs=[], labels=labels, tokens=tokens), len(ids)


def run(coro):
    return asyncio.run(coro)


class FfiTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.data_dir = os.path.join(self.tmp.name, "device")
        self.device = Device(DeviceConfig(data_dir=self.data_dir))

    def tearDown(self):
        self.tmp.cleanup()

    def load_mlp(self, device=None):
        with open(os.path.join(MODELS, "mlp.onnx"), "rb") as f:
            return run((device or self.device).load_model_onnx(f.read()))

    def test_identity_is_created_once_and_kept(self):
        key = self.device.public_key()
        self.assertEqual(len(key), 64)
        int(key, 16)
        again = Device(DeviceConfig(data_dir=self.data_dir))
        self.assertEqual(again.public_key(), key)
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "device.key")))
        other = Device(DeviceConfig(data_dir=os.path.join(self.tmp.name, "other")))
        self.assertNotEqual(other.public_key(), key)

    def test_zoo_model_loads_and_equals_the_shipped_file(self):
        self.assertIsNone(self.device.model_info())
        info = self.load_mlp()
        self.assertEqual(info.parameters, MLP_PARAMETERS)
        self.assertEqual(info.input_shape, [1, 28, 28])
        self.assertEqual(info.input_values_per_sample, 784)
        self.assertEqual(info.outputs_per_sample, 10)
        self.assertEqual(self.device.model_info(), info)
        self.assertIn("mlp", zoo_models())
        built = Device(DeviceConfig(data_dir=os.path.join(self.tmp.name, "zoo")))
        self.assertEqual(run(built.load_zoo_model("mlp")).version, info.version)

    def test_inference_on_a_real_mnist_batch(self):
        self.load_mlp()
        batch = mnist(8000, 8016)
        out = run(self.device.infer(batch.inputs))
        self.assertEqual(out.batch, 16)
        self.assertEqual(out.outputs_per_sample, 10)
        self.assertEqual(len(out.values), 16 * 10)
        self.assertTrue(all(math.isfinite(v) for v in out.values))
        # Different digits give different logits.
        self.assertNotEqual(out.values[:10], out.values[10:20])
        # A batch of one is the first row of the batch of sixteen.
        one = run(self.device.infer(batch.inputs[:784]))
        self.assertEqual(one.batch, 1)
        for a, b in zip(one.values, out.values[:10]):
            self.assertAlmostEqual(a, b, places=4)

    def test_training_changes_parameters_and_loss_is_finite(self):
        self.load_mlp()
        before = run(self.device.parameters())
        self.assertEqual(len(before), MLP_PARAMETERS)
        report = run(
            self.device.train(
                mnist(0, 256), TrainOptions(steps=4, batch_size=32, learning_rate=0.05)
            )
        )
        self.assertEqual(report.steps, 4)
        self.assertEqual(report.samples, 128)
        self.assertEqual(report.samples_since_load, 128)
        self.assertTrue(math.isfinite(report.mean_loss))
        self.assertTrue(math.isfinite(report.last_loss))
        # An untrained 10-class model starts near ln(10).
        self.assertLess(report.mean_loss, 2 * math.log(10))
        after = run(self.device.parameters())
        self.assertEqual(len(after), MLP_PARAMETERS)
        changed = sum(1 for a, b in zip(before, after) if a != b)
        self.assertGreater(changed, MLP_PARAMETERS // 10)
        # A second call continues from the trained parameters.
        again = run(self.device.train(mnist(256, 512), TrainOptions(epochs=1)))
        self.assertEqual(again.steps, 8)
        self.assertEqual(again.samples_since_load, 128 + 256)

    def test_signed_compressed_update_verifies_and_binds_its_payload(self):
        self.load_mlp()
        run(self.device.train(mnist(0, 128), TrainOptions(steps=2)))
        dense = run(self.device.make_update("dense-f32", 7, False))
        self.assertGreaterEqual(len(dense.payload), 4 * MLP_PARAMETERS)
        update = run(self.device.make_update("topk:0.1+q8", 7, True))
        self.assertGreater(len(update.payload), 0)
        self.assertLess(len(update.payload), len(dense.payload) // 4)
        self.assertEqual(len(update.signature), 64)
        self.assertEqual(update.round_id, 7)
        self.assertEqual(update.sample_count, 64)
        self.assertEqual(update.dimension, MLP_PARAMETERS)
        self.assertEqual(update.codec, "topk:0.1+q8")
        self.assertEqual(update.device_public_key, self.device.public_key())
        self.assertEqual(update.model_version, self.device.model_info().version)
        # Error feedback keeps the residual in the data directory.
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "residual.bin")))
        checked = verify_update(
            update.manifest, update.signature, update.payload, update.dimension
        )
        self.assertEqual(checked.round_id, 7)
        self.assertEqual(checked.sample_count, 64)
        self.assertEqual(checked.device_public_key, self.device.public_key())
        self.assertEqual(checked.dimension, MLP_PARAMETERS)
        self.assertGreater(checked.nonzero, 0)
        self.assertLessEqual(checked.nonzero, math.ceil(MLP_PARAMETERS * 0.1))
        tampered = bytearray(update.payload)
        tampered[-1] ^= 1
        with self.assertRaises(FedgeError.BadUpdate):
            verify_update(update.manifest, update.signature, bytes(tampered), update.dimension)
        forged = bytearray(update.signature)
        forged[0] ^= 1
        with self.assertRaises(FedgeError.BadUpdate):
            verify_update(update.manifest, bytes(forged), update.payload, update.dimension)

    def test_a_token_model_infers_and_trains_on_real_text(self):
        with open(os.path.join(MODELS, "char_model.onnx"), "rb") as f:
            info = run(self.device.load_model_onnx(f.read()))
        samples, vocab = shakespeare_windows(1000, 64)
        self.assertEqual(info.input_type, "int64")
        self.assertEqual(info.token_limit, vocab)
        self.assertEqual(info.input_values_per_sample, 32)
        self.assertEqual(info.outputs_per_sample, vocab)
        out = run(self.device.infer_tokens(samples.tokens[: 4 * 32]))
        self.assertEqual(out.batch, 4)
        self.assertEqual(len(out.values), 4 * vocab)
        self.assertTrue(all(math.isfinite(v) for v in out.values))
        options = TrainOptions(steps=8, batch_size=16, learning_rate=0.5, optimizer="sgd")
        first = run(self.device.train(samples, options))
        again = run(self.device.train(samples, options))
        self.assertTrue(math.isfinite(first.mean_loss))
        self.assertLess(again.mean_loss, first.mean_loss)
        # Token ids outside the embedding, float inputs to a token model,
        # and a sample given in both fields are refused; the model stays.
        bad = list(samples.tokens[:32])
        bad[5] = vocab
        with self.assertRaises(FedgeError.BadInput) as outside:
            run(self.device.infer_tokens(bad))
        self.assertIn(str(vocab), outside.exception.detail)
        bad[5] = -1
        with self.assertRaises(FedgeError.BadInput):
            run(self.device.train(Samples(inputs=[], labels=[0], tokens=bad), options))
        with self.assertRaises(FedgeError.BadInput):
            run(self.device.infer([0.0] * 32))
        with self.assertRaises(FedgeError.BadInput):
            run(
                self.device.train(
                    Samples(inputs=[0.0] * 32, labels=[0], tokens=samples.tokens[:32]),
                    options,
                )
            )
        self.assertEqual(len(run(self.device.infer_tokens(samples.tokens[:32])).values), vocab)
        # And a float model refuses token ids.
        self.load_mlp()
        with self.assertRaises(FedgeError.BadInput):
            run(self.device.infer_tokens([0] * 784))

    def test_a_causal_transformer_infers_every_position_and_trains(self):
        # The zoo's transformer: int64 tokens in, the next character's
        # logits at each of the 32 positions out; trained on the next
        # character at every position.
        with open(os.path.join(MODELS, "char_transformer.onnx"), "rb") as f:
            info = run(self.device.load_model_onnx(f.read()))
        samples, vocab = shakespeare_windows(1000, 64)
        self.assertEqual(info.input_type, "int64")
        self.assertEqual(info.token_limit, vocab)
        self.assertEqual(info.input_values_per_sample, 32)
        self.assertEqual(info.outputs_per_sample, 32 * vocab)
        out = run(self.device.infer_tokens(samples.tokens[: 2 * 32]))
        self.assertEqual(out.batch, 2)
        self.assertEqual(len(out.values), 2 * 32 * vocab)
        self.assertTrue(all(math.isfinite(v) for v in out.values))
        options = TrainOptions(steps=8, batch_size=16, learning_rate=0.003, optimizer="adam")
        first = run(self.device.train(samples, options))
        again = run(self.device.train(samples, options))
        self.assertTrue(math.isfinite(first.mean_loss))
        self.assertLess(again.mean_loss, first.mean_loss)

    def test_errors_cross_as_typed_exceptions(self):
        with self.assertRaises(FedgeError.NoModel):
            run(self.device.infer([0.0] * 784))
        with self.assertRaises(FedgeError.BadModel) as bad:
            run(self.device.load_model_onnx(b"these bytes are not an ONNX model"))
        self.assertIsInstance(bad.exception, FedgeError)
        self.assertIn("model", str(bad.exception))
        with self.assertRaises(FedgeError.BadModel):
            run(self.device.load_zoo_model("resnet-9000"))
        self.load_mlp()
        with self.assertRaises(FedgeError.BadInput) as wrong_length:
            run(self.device.infer([0.5] * 783))
        self.assertIn("784", wrong_length.exception.detail)
        with self.assertRaises(FedgeError.BadInput):
            run(self.device.train(Samples(inputs=[0.0] * 784, labels=[10]), TrainOptions()))
        with self.assertRaises(FedgeError.BadInput):
            run(self.device.train(mnist(0, 4), TrainOptions(optimizer="lbfgs")))
        with self.assertRaises(FedgeError.BadInput):
            run(self.device.make_update("q8", 1, False))  # nothing trained yet
        run(self.device.train(mnist(0, 32), TrainOptions(steps=1)))
        with self.assertRaises(FedgeError.Codec):
            run(self.device.make_update("zip", 1, False))
        with self.assertRaises(FedgeError.Config):
            run(self.device.run_rounds(mnist(0, 32), 1))
        with self.assertRaises(FedgeError.Config):
            Device(DeviceConfig(data_dir=self.data_dir, aggregator="127.0.0.1:4433"))
        with self.assertRaises(FedgeError.Config):
            Device(
                DeviceConfig(
                    data_dir=self.data_dir,
                    aggregator="127.0.0.1:4433",
                    aggregator_fingerprint="not-hex",
                )
            )
        # The device still works after every error.
        out = run(self.device.infer([0.5] * 784))
        self.assertEqual(len(out.values), 10)


if __name__ == "__main__":
    unittest.main(verbosity=2)
