"""Shared test set-up: CPU, float32 matmuls at full precision, so references in float64 can be tight."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def fake_prepared(name, data_dir, splits=("train", "test"), file_format="array_record"):
  """The metadata a `tfds build` leaves (dataset_info.json, features.json), without the records: with
  `tfds.testing.mock_data(data_dir=...)` the data layer then reads mock records through `tfds.data_source`."""
  import tensorflow_datasets as tfds
  b = tfds.builder(name, data_dir=data_dir, file_format=file_format)
  suffix = "array_record" if file_format == "array_record" else "tfrecord"
  b.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name=s, shard_lengths=[8], num_bytes=0, filename_template=tfds.core.ShardedFileTemplate(
          data_dir=b.data_dir, dataset_name=name, split=s, filetype_suffix=suffix)) for s in splits]))
  os.makedirs(b.data_dir, exist_ok=True)
  b.info.write_to_directory(b.data_dir)
