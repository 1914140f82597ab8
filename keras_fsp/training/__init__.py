"""Training runs in the library: the one training loop (`train`), the run
folder that names every file (`RunFolder`), checkpoints with atomic I/O
(`checkpoints`, `files`) and the callbacks of a run (`callbacks`)."""

from keras_fsp.training.checkpoints import Checkpoint, Checkpoints, verify_checkpoint
from keras_fsp.training.device import device_name, on_accelerator, use_compilation_cache
from keras_fsp.training.loop import epoch_stream, steps_per_epoch, train
from keras_fsp.training.run_folder import Log, RunFolder
from keras_fsp.training.scores import accuracy_and_loss

__all__ = [
    "Checkpoint",
    "Checkpoints",
    "Log",
    "RunFolder",
    "accuracy_and_loss",
    "device_name",
    "epoch_stream",
    "on_accelerator",
    "steps_per_epoch",
    "train",
    "use_compilation_cache",
    "verify_checkpoint",
]
