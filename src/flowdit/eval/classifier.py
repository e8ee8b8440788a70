"""A reference classifier trained on real images, used to check that class-conditional
samples show the class they were asked for.

It is an RBF support-vector machine on raw pixels (scikit-learn), fitted in about a second
on the embedded digits. It is independent of the generative model: it never sees
generated images and never guides sampling, so scoring samples with it is fair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ReferenceClassifier:
    """Predicts class indices of images ``[N, C, H, W]`` in ``[-1, 1]``."""

    svm: object
    test_accuracy: float

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.svm.predict(_features(images))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of ``images`` classified as their ``labels [N]``."""
        return float(np.mean(self.predict(images) == np.asarray(labels)))


def _features(images: torch.Tensor) -> np.ndarray:
    return images.detach().float().cpu().flatten(1).numpy()


def fit_reference_classifier(train_images: torch.Tensor, train_labels: torch.Tensor,
                             test_images: torch.Tensor, test_labels: torch.Tensor,
                             max_train: int = 10000, seed: int = 0) -> ReferenceClassifier:
    """Fit the SVM on (at most ``max_train``) real training images and report its accuracy
    on a disjoint real test split, so a sample accuracy can be read against it."""
    from sklearn.svm import SVC

    n = len(train_images)
    if n > max_train:
        keep = np.random.default_rng(seed).choice(n, max_train, replace=False)
        train_images, train_labels = train_images[keep], train_labels[keep]
    svm = SVC(kernel="rbf", gamma="scale", C=10.0).fit(_features(train_images), np.asarray(train_labels))
    clf = ReferenceClassifier(svm, 0.0)
    clf.test_accuracy = clf.accuracy(test_images, test_labels)
    return clf
