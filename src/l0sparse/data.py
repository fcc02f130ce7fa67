"""Dataset loaders. Nothing is downloaded: each loader reads a locally installed source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "load_digits_split"]


@dataclass
class Split:
    """Train and test tensors of one dataset."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_features(self) -> int:
        return int(self.x_train[0].numel())

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1


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
