"""Model definitions used by the papers."""

from keras_fsp.models.cifar_resnet import block_names, cifar_resnet, dense_taps

__all__ = ["block_names", "cifar_resnet", "dense_taps"]
