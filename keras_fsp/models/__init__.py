"""Model definitions used by the papers."""

from keras_fsp.models.cifar_resnet import block_names, cifar_resnet

__all__ = ["block_names", "cifar_resnet"]
