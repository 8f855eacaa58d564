"""Image (and 1-D signal) classification: top-1 / top-5 on ImageFolder, CIFAR, digits, MNIST-1D."""

from .task import ClassificationTask

__all__ = ["ClassificationTask"]
