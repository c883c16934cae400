"""The same network in PyTorch and Keras, with identical weights and inputs, gives the same
captured factors (A, G, unit-wise F) and the same preconditioned gradients: to 5e-5 relative
(Frobenius) in float32, and to 1e-11 in float64, which shows that the float32 differences are
rounding (factors agree to ~1e-6 in float32; the largest difference, ~2e-5, is BatchNorm's
preconditioned gamma, where the ill-conditioned 2x2 unit-wise solves amplify F's rounding).

The torch reference runs in a subprocess (a torch-only script, no Horovod) that writes an .npz;
this TF process compares. Layouts differ only where the frameworks do: Conv2D patches are
(i, j, c) in Keras and (c, i, j) in torch (A is compared after that permutation), kernels are
transposed, images are NHWC vs NCHW.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_ngd.communicator import SingleProcessCommunicator  # noqa: E402
from hvd_ngd.tensorflow import KFAC  # noqa: E402

import keras  # noqa: E402  (Keras 3)
from tests.tensorflow.float_dtype import set_float_dtype  # noqa: E402
ROOT = Path(__file__).resolve().parents[2]
N, H, W, C_IN, C_OUT, VOCAB, DIM, TOKENS, HIDDEN, CLASSES = 6, 4, 4, 2, 3, 7, 3, 3, 5, 4
EPS = 1e-3
CONFIG = dict(damping=0.05, factor_decay=0.0, kl_clip=None, strategy="comm-opt")
TOLERANCE = {"float32": 5e-5, "float64": 1e-11}

TORCH_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from torch import nn
    from hvd_ngd.communicator import SingleProcessCommunicator
    from hvd_ngd.torch.preconditioner import KFAC

    src, dst, config, dtype = sys.argv[1], sys.argv[2], eval(sys.argv[3]), sys.argv[4]
    d = dict(np.load(src))
    torch.set_default_dtype(getattr(torch, dtype))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d({C_IN}, {C_OUT}, 3, padding=1)
            self.bn = nn.BatchNorm2d({C_OUT}, eps={EPS})
            self.emb = nn.Embedding({VOCAB}, {DIM})
            self.fc1 = nn.Linear({C_OUT} + {DIM}, {HIDDEN})
            self.ln = nn.LayerNorm({HIDDEN}, eps={EPS})
            self.fc2 = nn.Linear({HIDDEN}, {CLASSES}, bias=False)

        def forward(self, x, ids):
            h = self.bn(torch.relu(self.conv(x))).mean((2, 3))
            h = torch.cat([h, self.emb(ids).mean(1)], 1)
            return self.fc2(self.ln(torch.tanh(self.fc1(h))))

    net = Net()
    with torch.no_grad():
        net.conv.weight.copy_(torch.from_numpy(d["conv_kernel"].transpose(3, 2, 0, 1)))
        net.conv.bias.copy_(torch.from_numpy(d["conv_bias"]))
        net.bn.weight.copy_(torch.from_numpy(d["bn_gamma"]))
        net.bn.bias.copy_(torch.from_numpy(d["bn_beta"]))
        net.emb.weight.copy_(torch.from_numpy(d["emb"]))
        net.fc1.weight.copy_(torch.from_numpy(d["fc1_kernel"].T))
        net.fc1.bias.copy_(torch.from_numpy(d["fc1_bias"]))
        net.ln.weight.copy_(torch.from_numpy(d["ln_gamma"]))
        net.ln.bias.copy_(torch.from_numpy(d["ln_beta"]))
        net.fc2.weight.copy_(torch.from_numpy(d["fc2_kernel"].T))
    kfac = KFAC(net, communicator=SingleProcessCommunicator(), **config)
    x = torch.from_numpy(d["x"].transpose(0, 3, 1, 2).copy())
    loss = nn.functional.cross_entropy(net(x, torch.from_numpy(d["ids"])), torch.from_numpy(d["y"]))
    loss.backward()
    plain = {{n: p.grad.clone() for n, p in net.named_parameters()}}
    kfac.step()
    out = {{"factor/" + k: v.numpy() for k, v in kfac.engine.factors.items()}}
    out.update({{"plain/" + n: g.numpy() for n, g in plain.items()}})
    out.update({{"pgrad/" + n: p.grad.numpy() for n, p in net.named_parameters()}})
    np.savez(dst, **out)
    """
)


def build_keras_model():
    x_in = keras.Input((H, W, C_IN), name="x")
    ids_in = keras.Input((TOKENS,), dtype="int32", name="ids")
    h = keras.layers.Conv2D(C_OUT, 3, padding="same", activation="relu", name="conv")(x_in)
    h = keras.layers.BatchNormalization(epsilon=EPS, name="bn")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    e = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(VOCAB, DIM, name="emb")(ids_in))
    h = keras.layers.Dense(HIDDEN, activation="tanh", name="fc1")(keras.layers.Concatenate()([h, e]))
    h = keras.layers.LayerNormalization(epsilon=EPS, name="ln")(h)
    out = keras.layers.Dense(CLASSES, use_bias=False, name="fc2")(h)
    return keras.Model([x_in, ids_in], out)


def conv_patch_permutation(kh: int, kw: int, channels: int) -> np.ndarray:
    """perm[k] = torch (c, i, j) index of Keras (i, j, c) patch index k."""
    return np.array([c * kh * kw + i * kw + j for i in range(kh) for j in range(kw) for c in range(channels)])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    set_float_dtype(request.param)
    yield request.param
    set_float_dtype("float32")


def test_factors_and_preconditioned_gradients_match_torch(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(11)
    f32 = np.dtype(dtype)
    weights = {
        "conv_kernel": rng.normal(0, 0.4, (3, 3, C_IN, C_OUT)).astype(f32), "conv_bias": rng.normal(0, 0.1, C_OUT).astype(f32),
        "bn_gamma": rng.uniform(0.5, 1.5, C_OUT).astype(f32), "bn_beta": rng.normal(0, 0.2, C_OUT).astype(f32),
        "emb": rng.normal(0, 1, (VOCAB, DIM)).astype(f32),
        "fc1_kernel": rng.normal(0, 0.5, (C_OUT + DIM, HIDDEN)).astype(f32), "fc1_bias": rng.normal(0, 0.1, HIDDEN).astype(f32),
        "ln_gamma": rng.uniform(0.5, 1.5, HIDDEN).astype(f32), "ln_beta": rng.normal(0, 0.2, HIDDEN).astype(f32),
        "fc2_kernel": rng.normal(0, 0.5, (HIDDEN, CLASSES)).astype(f32),
    }
    data = {"x": rng.normal(size=(N, H, W, C_IN)).astype(f32), "ids": rng.integers(0, VOCAB, (N, TOKENS)),
            "y": rng.integers(0, CLASSES, N)}
    src, dst = tmp_path / "inputs.npz", tmp_path / "torch.npz"
    np.savez(src, **weights, **data)
    script = tmp_path / "torch_reference.py"
    script.write_text(TORCH_SCRIPT.format(C_IN=C_IN, C_OUT=C_OUT, EPS=EPS, VOCAB=VOCAB, DIM=DIM, HIDDEN=HIDDEN, CLASSES=CLASSES))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(script), str(src), str(dst), repr(CONFIG), dtype], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = dict(np.load(dst))

    model = build_keras_model()
    layer = {lay.name: lay for lay in model.layers}
    layer["conv"].kernel.assign(weights["conv_kernel"])
    layer["conv"].bias.assign(weights["conv_bias"])
    layer["bn"].gamma.assign(weights["bn_gamma"])
    layer["bn"].beta.assign(weights["bn_beta"])
    layer["emb"].embeddings.assign(weights["emb"])
    layer["fc1"].kernel.assign(weights["fc1_kernel"])
    layer["fc1"].bias.assign(weights["fc1_bias"])
    layer["ln"].gamma.assign(weights["ln_gamma"])
    layer["ln"].beta.assign(weights["ln_beta"])
    layer["fc2"].kernel.assign(weights["fc2_kernel"])
    kfac = KFAC(model, communicator=SingleProcessCommunicator(), **CONFIG)
    assert sorted(lay.name for lay in kfac.layers) == ["bn", "conv", "emb", "fc1", "fc2", "ln"]
    with tf.GradientTape() as tape:
        logits = model([data["x"], data["ids"]], training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(data["y"], logits, from_logits=True))
    grads = kfac.gradient(tape, loss, model.trainable_variables)
    got = {v.path: g.numpy()
           for v, g in zip(model.trainable_variables, grads)}
    factors = {k: v.numpy() for k, v in kfac.engine.factors.items()}

    perm = np.concatenate([conv_patch_permutation(3, 3, C_IN), [9 * C_IN]])  # bias column stays last
    checks = {
        "conv/A": (factors["conv/A"], ref["factor/conv/A"][np.ix_(perm, perm)]),
        "conv/G": (factors["conv/G"], ref["factor/conv/G"]),
        "emb/A": (factors["emb/A"], ref["factor/emb/A"]),
        "emb/G": (factors["emb/G"], ref["factor/emb/G"]),
        "fc1/A": (factors["fc1/A"], ref["factor/fc1/A"]),
        "fc1/G": (factors["fc1/G"], ref["factor/fc1/G"]),
        "fc2/A": (factors["fc2/A"], ref["factor/fc2/A"]),
        "fc2/G": (factors["fc2/G"], ref["factor/fc2/G"]),
        "bn/F": (factors["bn/F"], ref["factor/bn/F"]),
        "ln/F": (factors["ln/F"], ref["factor/ln/F"]),
        "conv kernel": (got["conv/kernel"], ref["pgrad/conv.weight"].transpose(2, 3, 1, 0)),
        "conv bias": (got["conv/bias"], ref["pgrad/conv.bias"]),
        "bn gamma": (got["bn/gamma"], ref["pgrad/bn.weight"]),
        "bn beta": (got["bn/beta"], ref["pgrad/bn.bias"]),
        "embedding": (got["emb/embeddings"], ref["pgrad/emb.weight"]),
        "fc1 kernel": (got["fc1/kernel"], ref["pgrad/fc1.weight"].T),
        "fc1 bias": (got["fc1/bias"], ref["pgrad/fc1.bias"]),
        "ln gamma": (got["ln/gamma"], ref["pgrad/ln.weight"]),
        "ln beta": (got["ln/beta"], ref["pgrad/ln.bias"]),
        "fc2 kernel": (got["fc2/kernel"], ref["pgrad/fc2.weight"].T),
    }
    errors = {name: rel(a, b) for name, (a, b) in checks.items()}
    print("relative differences Keras vs torch:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert not rel(got["fc2/kernel"], ref["plain/fc2.weight"].T) < 1e-3, "preconditioning changed nothing"
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE[dtype]}
    assert not bad, f"Keras and torch differ: {bad}"


TORCH_TRAJECTORY = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from torch import nn
    from hvd_ngd.communicator import SingleProcessCommunicator
    from hvd_ngd.torch.preconditioner import KFAC

    src, dst, config, lr, batch = sys.argv[1], sys.argv[2], eval(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    d = dict(np.load(src))
    torch.set_default_dtype(torch.float64)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, eps={EPS}), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 64, 10))
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(d["conv_kernel"].transpose(3, 2, 0, 1)))
        net[0].bias.copy_(torch.from_numpy(d["conv_bias"]))
        # Keras flattens NHWC as (h, w, c), torch NCHW as (c, h, w)
        dense = d["dense_kernel"].reshape(8, 8, 4, 10).transpose(2, 0, 1, 3).reshape(256, 10)
        net[4].weight.copy_(torch.from_numpy(dense.T))
        net[4].bias.copy_(torch.from_numpy(d["dense_bias"]))
    kfac = KFAC(net, communicator=SingleProcessCommunicator(), lr=lr, **config)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.5)
    x, y = torch.from_numpy(d["x"].transpose(0, 3, 1, 2).copy()), torch.from_numpy(d["y"])
    for begin in range(0, len(y), batch):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[begin:begin + batch]), y[begin:begin + batch]).backward()
        kfac.step(lr)
        opt.step()
    dense = net[4].weight.detach().numpy().T.reshape(4, 8, 8, 10).transpose(1, 2, 0, 3).reshape(256, 10)
    np.savez(dst, conv_kernel=net[0].weight.detach().numpy().transpose(2, 3, 1, 0), conv_bias=net[0].bias.detach().numpy(),
             bn_gamma=net[1].weight.detach().numpy(), bn_beta=net[1].bias.detach().numpy(), dense_kernel=dense,
             dense_bias=net[4].bias.detach().numpy())
    """
)


def test_model_fit_trajectory_matches_torch(tmp_path: Path) -> None:
    """Twelve steps of SGD-momentum + K-FAC (running averages, KL clipping, a factor/inverse
    schedule) on scikit-learn digits: Keras ``model.fit`` with hvd_ngd's Keras optimizer and the
    torch adapter with ``torch.optim.SGD`` end with the same weights (float64, 1e-9).

    Learning rate and momentum are exact in float32 (0.25, 0.5): tf-keras' SGD applies its momentum
    in float32 even for float64 variables, which alone moves the weights by ~1e-9 per step."""
    from sklearn.datasets import load_digits

    from hvd_ngd.tensorflow.keras import DistributedOptimizer

    set_float_dtype("float64")
    try:
        images, labels = load_digits(return_X_y=True)
        rng = np.random.default_rng(0)
        batch, steps, lr = 16, 12, 0.25
        idx = rng.permutation(len(labels))[: batch * steps]
        start = {"conv_kernel": rng.normal(0, 0.3, (3, 3, 1, 4)), "conv_bias": rng.normal(0, 0.1, 4),
                 "dense_kernel": rng.normal(0, 0.05, (256, 10)), "dense_bias": np.zeros(10)}
        data = {"x": (images[idx] / 16.0).reshape(-1, 8, 8, 1), "y": labels[idx]}
        config = dict(damping=3e-3, kl_clip=1e-2, factor_decay=0.95, strategy="comm-opt",
                      factor_update_interval=2, inv_update_interval=4)
        src, dst = tmp_path / "inputs.npz", tmp_path / "torch.npz"
        np.savez(src, **start, **data)
        script = tmp_path / "torch_trajectory.py"
        script.write_text(TORCH_TRAJECTORY.format(EPS=EPS))
        done = subprocess.run([sys.executable, str(script), str(src), str(dst), repr(config), str(lr), str(batch)],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        ref = dict(np.load(dst))

        L = keras.layers
        model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, padding="same"), L.BatchNormalization(epsilon=EPS),
                                  L.ReLU(), L.Flatten(), L.Dense(10)])
        conv, bn, dense = model.layers[0], model.layers[1], model.layers[4]
        conv.kernel.assign(start["conv_kernel"])
        conv.bias.assign(start["conv_bias"])
        dense.kernel.assign(start["dense_kernel"])
        dense.bias.assign(start["dense_bias"])
        opt = DistributedOptimizer(keras.optimizers.SGD(lr, momentum=0.5), model, communicator=SingleProcessCommunicator(),
                                   **config)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(data["x"], data["y"], batch_size=batch, epochs=1, shuffle=False, verbose=0)
        assert opt.kfac.steps == steps
        got = {"conv_kernel": conv.kernel, "conv_bias": conv.bias, "bn_gamma": bn.gamma, "bn_beta": bn.beta,
               "dense_kernel": dense.kernel, "dense_bias": dense.bias}
        errors = {k: rel(v.numpy(), ref[k]) for k, v in got.items()}
        moved = rel(dense.kernel.numpy(), start["dense_kernel"])
        print("relative differences after 12 steps, Keras vs torch:", {k: f"{v:.1e}" for k, v in errors.items()},
              f"(weights moved by {moved:.2f})")
        assert moved > 0.1
        assert all(e < 1e-9 for e in errors.values()), errors
    finally:
        set_float_dtype("float32")
