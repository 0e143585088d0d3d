"""The 2019 project's method, reproduced for the benchmark's comparison (not used by the pipeline).

Each worker builds the original CNN from its own random initialisation, trains it with Adam on its
shard, and the weights are averaged without weighting. Workers run as parallel processes.
Last stdout line: JSON {"loss": ..., "accuracy": ..., "seconds": ...}.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def build_parser():
    parser = argparse.ArgumentParser(description="Original 2019 method: independent init, plain weight average.")
    parser.add_argument("--data-dir", required=True, help="directory with 0.npz .. N-1.npz and test.npz")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--epoch", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="TF threads per worker process (0 = TF default)")
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # internal: run one worker
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def build_original_model(keras):
    layers = keras.layers
    return keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Dropout(0.25),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(10, activation="softmax"),
    ])


def load(path):
    with np.load(path) as npz:
        return (npz["x"].astype("float32") / 255.0)[..., None], npz["y"].astype("int64")


def tf_setup(threads):
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def run_worker(args):
    tf_setup(args.threads)
    import keras

    keras.utils.set_random_seed(1000 + args.worker_index)  # independent init per worker, as in 2019
    x, y = load(os.path.join(args.data_dir, f"{args.worker_index}.npz"))
    model = build_original_model(keras)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=args.batch, epochs=args.epoch, verbose=2)
    np.savez(args.out, *model.get_weights())
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker_index is not None:
        return run_worker(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"{i}.npz") for i in range(args.workers)]
        procs = [subprocess.Popen([sys.executable, __file__, "--data-dir", args.data_dir, "--epoch", str(args.epoch),
                                   "--batch", str(args.batch), "--threads", str(args.threads),
                                   "--worker-index", str(i), "--out", outs[i]]) for i in range(args.workers)]
        if any(p.wait() != 0 for p in procs):
            print("original_method.py: error: a worker failed", file=sys.stderr)
            return 1
        per_worker = []
        for out in outs:
            with np.load(out) as npz:
                per_worker.append([npz[f"arr_{k}"] for k in range(len(npz.files))])
        averaged = [np.mean(arrays, axis=0) for arrays in zip(*per_worker)]  # plain, unweighted
        tf_setup(args.threads)
        import keras

        model = build_original_model(keras)
        model.set_weights(averaged)
        model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        loss, accuracy = model.evaluate(*load(os.path.join(args.data_dir, "test.npz")), batch_size=100, verbose=0)
    seconds = time.perf_counter() - started
    print(f"Test loss: {loss:.4f}\nTest accuracy: {accuracy:.4f}")
    print(json.dumps({"loss": float(loss), "accuracy": float(accuracy), "seconds": round(seconds, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
