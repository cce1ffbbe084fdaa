"""What the checksums of teacher logits on disk cost.

On `kd_keras.data.synthetic` data (1,000,000 examples of 784 float32 by
default, batch 500; teacher MLP 784-256-10), with the logits on disk as
float32 and as top 5:

- write: seconds to compute every batch's CRC-32 (`zlib`) and FarmHash
  fingerprint (`tf.fingerprint`) as they are written, against the whole
  build (the teacher's pass);
- reuse: seconds of a second call, which reads the input once and verifies
  every kept batch's CRC-32 and fingerprint, and of the verification alone;
- pipeline: the minimum over interleaved passes of reading the logits as the
  returned pipeline does (each shard read whole and cut into batches), then
  decoding them, without and with the fingerprint check per batch.

    python benchmarks/checksums.py [--quick] [--examples N]
"""

import pathlib
import tempfile
import time

from absl import app
from absl import flags
import common  # Before Keras: it sets the backend from --backend.
import keras

import kd_keras
from kd_keras import _logit_files

FLAGS = flags.FLAGS
common.define_backend_flag()
flags.DEFINE_bool("quick", False, "100,000 examples instead of 1,000,000.")
flags.DEFINE_integer("examples", None, "Synthetic examples.")
flags.DEFINE_integer("passes", 5, "Interleaved passes of each pipeline.")
flags.DEFINE_string(
    "output_dir", str(common.RESULTS), "Where to write the table and JSON."
)


def _seconds(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _drain(dataset):
    for _ in dataset:
        pass


def measure(teacher, data, options):
    directory = tempfile.mkdtemp(prefix="kd_keras_checksums_")
    build = _seconds(
        lambda: kd_keras.cache_teacher_logits(
            teacher, data, directory=directory, shuffle=False, **options
        )
    )
    reuse = _seconds(
        lambda: kd_keras.cache_teacher_logits(
            teacher, data, directory=directory, shuffle=False, **options
        )
    )
    (folder,) = pathlib.Path(directory).glob("data-*")
    index = _logit_files.read_index(folder)
    layout = index.layout
    contents = {s["file"]: (folder / s["file"]).read_bytes() for s in index.shards}
    payloads = [b.payload(contents[b.file], layout) for b in index.batches]
    crc = _seconds(
        lambda: [
            _logit_files.crc32(layout, b.digest, p)
            for b, p in zip(index.batches, payloads, strict=True)
        ]
    )
    fingerprint = _seconds(lambda: [_logit_files.fingerprint(p) for p in payloads])
    verify = _seconds(
        lambda: [
            _logit_files.crc32(layout, b.digest, p) == b.crc32
            and _logit_files.fingerprint(p) == b.fingerprint
            for b, p in zip(index.batches, payloads, strict=True)
        ]
    )
    records, verified = _logit_files.tf_batches(folder, index)
    pipelines = {
        "read": records,
        "read, decode": records.map(lambda raw, _: _logit_files.decode_tf(raw, layout)),
        "read, verify, decode": records.map(
            lambda raw, position: _logit_files.decode_rows_tf(
                verified(raw, position), layout
            )
        ),
    }
    passes = {name: [] for name in pipelines}
    for _ in range(FLAGS.passes):
        for name, dataset in pipelines.items():
            passes[name].append(_seconds(lambda dataset=dataset: _drain(dataset)))
    return {
        "build_s": build,
        "write_checksums_s": crc + fingerprint,
        "reuse_s": reuse,
        "reuse_verify_s": verify,
        "pipeline_s": {name: min(values) for name, values in passes.items()},
        "logits_bytes": sum(len(p) for p in payloads),
        "batches": len(payloads),
    }


def main(argv):
    del argv
    examples = FLAGS.examples or (100_000 if FLAGS.quick else 1_000_000)
    data = kd_keras.data.synthetic(examples, batch_size=500)
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    started = time.perf_counter()
    results = {
        "float32": measure(teacher, data, {}),
        "top-5": measure(teacher, data, {"top_k": 5}),
    }
    rows = []
    for mode, r in results.items():
        pipe = r["pipeline_s"]
        rows.append(
            {
                "logits": mode,
                "size": f"{r['logits_bytes'] / 1e6:.0f} MB",
                "write checksums / build": f"{r['write_checksums_s']:.2f} s / "
                f"{r['build_s']:.1f} s",
                "verify on reuse / reuse": f"{r['reuse_verify_s']:.2f} s / "
                f"{r['reuse_s']:.1f} s",
                "read, decode": f"{pipe['read, decode']:.2f} s",
                "read, verify, decode": f"{pipe['read, verify, decode']:.2f} s",
                "verify's share": "{:+.0%}".format(
                    pipe["read, verify, decode"] / pipe["read, decode"] - 1
                ),
            }
        )
    minutes = (time.perf_counter() - started) / 60
    heading = (
        f"# What the checksums cost ({examples:,} examples, batch 500, "
        f"{results['float32']['batches']} batches; pipeline figures are the "
        f"minimum of {FLAGS.passes} interleaved passes over the logits alone; "
        f"{minutes:.1f} min)"
    )
    name = "checksums_quick" if FLAGS.quick else "checksums_full"
    common.write_report(
        FLAGS,
        name,
        heading,
        common.markdown_table(rows, list(rows[0])),
        {"examples": examples, "results": results},
    )


if __name__ == "__main__":
    app.run(main)
