"""Pieces shared by trainer.py and evaluate.py: input checks, the model.
(What every stage shares, the command-line parser, atomic writes and the mlk_* attributes, is in
mlkcommon.py, the copy of common/mlkcommon.py.)

Kept free of TensorFlow imports at module level so argument and data errors are reported
before the (slow) TensorFlow start-up.
"""

import os
import sys
import zipfile

import numpy as np

from mlkcommon import error, parse_args

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


class InputError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


def run(parser, action, argv=None):
    """The main() of trainer.py and evaluate.py: parse argv with parser (usage error: one line, exit 2;
    --help: exit 0), then action(args); an InputError is one line `PROG: error: ...` and exit 2."""
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    try:
        action(args)
    except InputError as err:
        return error(parser.prog, err)
    return 0


def exit_now(code):
    """End a finished program with `code`: flush stdout and stderr, then skip the interpreter's teardown of
    TensorFlow's modules (about half a CPU-second per process, paid by every trainer every round). Call only
    once every result is written (renamed into place) and printed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def load_shard(path):
    """Read and check a shard (keys x uint8 (n, 28, 28), y integer (n,) in 0-9); returns (x, y)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise InputError(f"{path}: not an .npz archive")
            missing = [key for key in ("x", "y") if key not in npz.files]
            if missing:
                raise InputError(f"{path}: missing key(s) {', '.join(missing)} (has {', '.join(npz.files) or 'none'})")
            x, y = npz["x"], npz["y"]
    except InputError:
        raise
    except (AttributeError, TypeError):  # np.load of a plain .npy returns an ndarray, not an archive
        raise InputError(f"{path}: not an .npz archive") from None
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: cannot read as .npz ({err})") from None
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
        raise InputError(f"{path}: x must be uint8 of shape (n, 28, 28), got {x.dtype} {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise InputError(f"{path}: y must be integer labels of shape (n,), got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise InputError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise InputError(f"{path}: shard is empty")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise InputError(f"{path}: labels must be 0-9, found {int(y.min())}..{int(y.max())}")
    return x, y.astype(np.int64)


def to_model_input(x):
    """uint8 (n, 28, 28) -> float32 (n, 28, 28, 1) in [0, 1], the model's input contract."""
    return (x.astype(np.float32) / 255.0)[..., np.newaxis]


def import_keras():
    """`import keras`, without the matplotlib Keras imports when it is installed (keras.src.visualization, for
    plotting helpers these programs never call): about 0.6-1.3 CPU-seconds of every trainer process, paid
    every round. matplotlib stays importable afterwards (evaluate.py draws its plot with it)."""
    block = "matplotlib" not in sys.modules
    if block:
        sys.modules["matplotlib"] = None  # makes `import matplotlib...` raise ImportError, which Keras tolerates
    try:
        import keras
    finally:
        if block and sys.modules.get("matplotlib", False) is None:
            del sys.modules["matplotlib"]
    without_autotune_wait()
    return keras


def without_autotune_wait():
    """Keras feeds numpy arrays to fit, evaluate and predict through a tf.data pipeline with AUTOTUNE parallelism,
    and tf.data's autotuner runs a thread per iterator that deleting the iterator, at the end of every such call,
    waits for: 0-5 s on a busy machine (two trainers on 2 cores: a fit returned 4-5 s after its last epoch in about
    half the runs; docs/benchmarks.md, issue 30). This turns the autotuner off for that pipeline: the same batches
    in the same order (the same weights, bit for bit), the map's parallelism and the prefetch at their defaults.
    Done once; with a Keras whose adapter moved (the pinned one is tested) it changes nothing."""
    try:
        from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter
    except ImportError:
        return
    original = ArrayDataAdapter.get_tf_dataset
    if getattr(original, "mlk_without_autotune", False):
        return

    def get_tf_dataset(self):
        import tensorflow as tf

        options = tf.data.Options()
        options.autotune.enabled = False
        return original(self).with_options(options)

    get_tf_dataset.mlk_without_autotune, get_tf_dataset.mlk_original = True, original
    ArrayDataAdapter.get_tf_dataset = get_tf_dataset


def load_checked_model(path):
    """Load a .h5 model with compile=False and check it maps (None, 28, 28, 1) to 10 classes."""
    import h5py

    keras = import_keras()

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        if not h5py.is_hdf5(path):
            raise InputError(f"{path}: not an HDF5 model file")
        model = keras.models.load_model(path, compile=False)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as err:  # Keras raises many types for a bad file; all mean "not a usable model"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: cannot load as a Keras model ({first_line})") from None
    input_shape = tuple(model.inputs[0].shape) if model.inputs else None
    output_shape = tuple(model.outputs[0].shape) if model.outputs else None
    if input_shape != (None, *IMAGE_SHAPE, 1) or output_shape != (None, NUM_CLASSES):
        raise InputError(f"{path}: model maps {input_shape} -> {output_shape}, expected (None, 28, 28, 1) -> (None, 10)")
    return model
