"""The papers' networks and training procedures: the CIFAR ResNets of He et
al. (`cifar_resnet`), Hinton's MNIST multilayer perceptrons (`mnist_mlp`), and
`recipes`, the published schedules of FSP, dense FSP, FitNets, KD and the
methods keras_fsp adds."""

from keras_fsp.papers import recipes
from keras_fsp.papers.cifar_resnet import block_names, cifar_resnet, dense_taps, with_new_head

__all__ = ["block_names", "cifar_resnet", "dense_taps", "recipes", "with_new_head"]
