"""One epoch of the seed network on real Fashion-MNIST, where the machine has the files
(Debian: apt-get install dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist).

A smoke test of the whole path on real data, not a benchmark: 4000 training images, one epoch,
2000 test images. Measured on a 2-core CPU: test accuracy about 0.73 (chance is 0.10).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cnn_gpu.data import load_dataset
from cnn_gpu.models import seed_cnn
from cnn_gpu.optim import SGD
from cnn_gpu.training import fit

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (FASHION_DIR / "train-labels-idx1-ubyte.gz").exists(),
                       reason=f"Fashion-MNIST is not in {FASHION_DIR} (apt-get install dataset-fashion-mnist)"),
]


def test_one_epoch_on_fashion_mnist_is_well_above_chance(tmp_path):
    train = load_dataset("fashion-mnist", "train", data_dir=FASHION_DIR, download=False)
    test = load_dataset("fashion-mnist", "test", data_dir=FASHION_DIR, download=False)
    model = seed_cnn(num_classes=10, seed=0)
    optimizer = SGD(model.parameters(), lr=0.02, momentum=0.9)
    result = fit(model, optimizer, (train.images[:4000], train.labels[:4000]), epochs=1, batch_size=64,
                 test_data=(test.images[:2000], test.labels[:2000]),
                 seed=0, out_dir=tmp_path, progress=False, log=None)
    accuracy = result.last["test_accuracy"]
    assert accuracy > 0.60, f"test accuracy {accuracy:.4f} after one epoch on 4000 images"
