"""Hinton et al. (2015) on MNIST, side by side with the paper.

Runs `kd_keras.apps.reproduce.hinton_mnist` (the same as `kd-keras reproduce
hinton-mnist`) on MNIST from the shared IDX files (or tensorflow-datasets)
and writes benchmarks/results/hinton_mnist.md (or hinton_mnist_quick.md),
the JSON and two PNGs: one teacher output at T = 1, 2, 5, 10, 20, and test
errors against temperature.

    python benchmarks/hinton_mnist.py --quick      # about 10 minutes
    python benchmarks/hinton_mnist.py              # at most 90 minutes
"""

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.

from kd_keras.apps import reproduce

FLAGS = flags.FLAGS
common.define_run_flags(default_seeds="3, or 2 quick")


def main(argv):
    del argv
    if FLAGS.pipeline != "tfds":
        raise app.UsageError(
            "The reproduction reads MNIST through tensorflow-datasets: drop --pipeline."
        )
    result = reproduce.hinton_mnist(
        data_dir=common.mnist_data_dir(FLAGS.data_dir, FLAGS.idx_dir),
        output_dir=FLAGS.output_dir,
        quick=FLAGS.quick,
        seeds=FLAGS.seeds,
    )
    print(result["table"])


if __name__ == "__main__":
    app.run(main)
