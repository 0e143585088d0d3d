"""The accuracy test: evaluate a .h5 model on the MNIST test shard.

Prints the loss and accuracy, then a last stdout line of JSON {"loss": ..., "accuracy": ...}.
"""

import json
import sys

from mlk import InputError, load_checked_model, load_shard, run, to_model_input
from mlkcommon import Parser

DEFAULT_DATA = "/mnt/data/test.npz"  # the test shard on the shared volume (docs/CONTRACTS.md)


def build_parser():
    parser = Parser(prog="evaluate.py", description="Test a .h5 MNIST model; last stdout line is JSON loss/accuracy.")
    parser.add_argument("--modelpath", required=True, help="model .h5 to test")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"test .npz with keys x, y (default {DEFAULT_DATA})")
    parser.add_argument("--batch", type=int, default=100, help="batch size (default 100)")
    return parser


def evaluate(args):
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    x, y = load_shard(args.data)
    model = load_checked_model(args.modelpath)
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    loss, accuracy = model.evaluate(to_model_input(x), y, batch_size=args.batch, verbose=0)
    print(f"Test samples: {len(x)}")
    print(f"Test loss: {loss:.4f}")
    print(f"Test accuracy: {accuracy:.4f}")
    print(json.dumps({"loss": float(loss), "accuracy": float(accuracy)}), flush=True)


def main(argv=None) -> int:
    return run(build_parser(), evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
