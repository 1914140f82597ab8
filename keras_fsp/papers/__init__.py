"""The papers' networks and training procedures: the CIFAR ResNets of He et
al. (`cifar_resnet`), small Vision Transformers (`cifar_vit`), `recipes` (the published schedules of FSP, dense FSP,
FitNets, KD and the methods keras_fsp adds) and `methods`, the table of
methods by name that the command line and the results tables read."""

from keras_fsp.papers import methods, recipes
from keras_fsp.papers.cifar_resnet import block_names, cifar_resnet, dense_taps, with_new_head
from keras_fsp.papers.vit import PositionEmbedding, cifar_vit

__all__ = ["PositionEmbedding", "block_names", "cifar_resnet", "cifar_vit", "dense_taps", "methods",
           "recipes", "with_new_head"]
