"""``hvd_ngd.tensorflow.keras.callbacks`` in one process: per-epoch K-FAC schedules reach the
engine, K-FAC state saved by the checkpoint callback resumes training bitwise, clear errors."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from hvd_ngd.communicator import SingleProcessCommunicator  # noqa: E402
from hvd_ngd.tensorflow.keras import DistributedOptimizer  # noqa: E402
from hvd_ngd.tensorflow.keras.callbacks import (  # noqa: E402
    KFACCheckpointCallback,
    KFACScheduleCallback,
    load_kfac_state,
)
from tests.tensorflow.keras.test_optimizer import N, data, make_model  # noqa: E402

import keras  # noqa: E402  (Keras 3)
pytestmark = pytest.mark.usefixtures("float64")
CFG = dict(damping=0.05, kl_clip=1e-2, strategy="comm-opt", factor_update_interval=2, inv_update_interval=3)


def compiled(**config):
    keras.backend.clear_session()  # the same layer names for every model (checkpoints are keyed by name)
    model = make_model()
    opt = DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), model,
                               communicator=SingleProcessCommunicator(), **dict(CFG, **config))
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, opt


def test_schedule_sets_values_each_epoch_and_logs_them() -> None:
    x, y = data()
    model, opt = compiled()
    seen = []
    probe = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(
        (opt.kfac.engine.schedule.values.damping, opt.kfac.engine.layer_damping[opt.kfac.layers[0].name])))
    schedule = KFACScheduleCallback(damping=lambda epoch: 0.05 * 0.5**epoch, inv_update_interval=lambda epoch: 1 + epoch)
    history = model.fit(x, y, batch_size=N, epochs=3, shuffle=False, verbose=0, callbacks=[schedule, probe])
    assert [d for d, _ in seen] == pytest.approx([0.05, 0.025, 0.0125])
    assert [d for _, d in seen] == pytest.approx([0.05, 0.025, 0.0125])  # reaches every layer
    assert history.history["kfac_damping"] == pytest.approx([0.05, 0.025, 0.0125])
    assert history.history["kfac_inv_update_interval"] == [1.0, 2.0, 3.0]
    assert opt.kfac.engine.hyperparameters()["inv_update_interval"] == 3.0


def test_schedule_changes_the_trajectory_as_a_config_change_would() -> None:
    """Damping 0.2 from epoch 0 via the callback equals a run configured with damping 0.2."""
    x, y = data()
    model, _ = compiled()
    model.fit(x, y, batch_size=N, epochs=2, shuffle=False, verbose=0,
              callbacks=[KFACScheduleCallback(damping=lambda epoch: 0.2)])
    reference, _ = compiled(damping=0.2)
    reference.fit(x, y, batch_size=N, epochs=2, shuffle=False, verbose=0)
    plain, _ = compiled()
    plain.fit(x, y, batch_size=N, epochs=2, shuffle=False, verbose=0)
    for a, b, c in zip(model.trainable_variables, reference.trainable_variables, plain.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not all(np.array_equal(a.numpy(), c.numpy()) for a, c in zip(model.trainable_variables, plain.trainable_variables))


def test_schedule_rejects_bad_names_and_values() -> None:
    with pytest.raises(ValueError, match="learning rate"):
        KFACScheduleCallback(lr=lambda epoch: 0.1)
    with pytest.raises(ValueError, match="strategy"):
        KFACScheduleCallback(strategy=lambda epoch: "spngd")
    with pytest.raises(ValueError, match="callable"):
        KFACScheduleCallback(damping=0.1)
    x, y = data()
    model, _ = compiled()
    with pytest.raises(ValueError, match="damping"):
        model.fit(x, y, batch_size=N, epochs=1, verbose=0, callbacks=[KFACScheduleCallback(damping=lambda e: -1.0)])
    plain = make_model()
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    with pytest.raises(ValueError, match="DistributedOptimizer"):
        plain.fit(x, np.zeros((4 * N, 3)), batch_size=N, epochs=1, verbose=0,
                  callbacks=[KFACScheduleCallback(damping=lambda e: 0.1)])


def test_checkpoint_resume_is_bitwise_identical(tmp_path: Path) -> None:
    """Train 2 epochs saving weights (with optimizer slots) and K-FAC state; a fresh model,
    optimizer and preconditioner resumed from them trains epochs 3-4 exactly like the
    uninterrupted run (factor/inverse intervals 2/3 do not align with the 4-step epochs)."""
    x, y = data()
    full, full_opt = compiled()
    full.fit(x, y, batch_size=N, epochs=4, shuffle=False, verbose=0)

    first, _ = compiled()
    ckpt = KFACCheckpointCallback(tmp_path / "kfac-{epoch}.pkl")
    first.fit(x, y, batch_size=N, epochs=2, shuffle=False, verbose=0, callbacks=[ckpt])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kfac-1.pkl", "kfac-2.pkl"]
    first.save_weights(str(tmp_path / "model.weights.h5"))  # Keras 3: weights and optimizer variables

    resumed, resumed_opt = compiled()
    resumed.fit(x[:N], y[:N], batch_size=N, epochs=1, verbose=0)  # creates the optimizer's slots
    resumed.load_weights(str(tmp_path / "model.weights.h5"))
    load_kfac_state(tmp_path / "kfac-2.pkl", resumed)
    assert resumed_opt.kfac.steps == 8 and int(resumed_opt.iterations.numpy()) == 8
    resumed.fit(x, y, batch_size=N, epochs=4, initial_epoch=2, shuffle=False, verbose=0)
    assert resumed_opt.kfac.steps == full_opt.kfac.steps == 16
    for a, b in zip(resumed.trainable_variables, full.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_checkpoint_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every"):
        KFACCheckpointCallback("x.pkl", every=0)
