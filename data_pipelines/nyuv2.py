"""NYUv2 (13-class segmentation, depth, surface normals), mtan / auto-lambda preprocessing.

Expected files (``data_dir`` is the folder holding ``train`` and ``val``; 795 / 654
examples at 288x384 in the real set)::

    data_dir/{train,val}/image/{i}.npy    float (288, 384, 3) in [0, 1]
    data_dir/{train,val}/label/{i}.npy    (288, 384) integers 0..12, -1 ignore
    data_dir/{train,val}/depth/{i}.npy    float (288, 384, 1), metres, 0 invalid
    data_dir/{train,val}/normal/{i}.npy   float (288, 384, 3) in [-1, 1], all-zero invalid

``make_dataset(data_dir, split, batch_size, *, augment=None, seed=0, epoch=0,
start_step=0, ...)`` yields dicts of numpy arrays:

    image   float32 (B, H, W, 3) in [-1, 1]
    seg     int32   (B, H, W), -1 ignore
    depth   float32 (B, H, W, 1), 0 invalid
    normal  float32 (B, H, W, 3), all-zero invalid
    index   int64   (B,), the example's number in its split

See ``data_pipelines.scenes`` for preparation (TFDS, cached outside ``data_dir``),
ordering, resume, process shards and augmentation.
"""

from __future__ import annotations

import functools

from data_pipelines import scenes

FORMAT = scenes.NYUV2
make_dataset = functools.partial(scenes.make_dataset, FORMAT)
open_source = functools.partial(scenes.SceneSource, FORMAT)
prepare = functools.partial(scenes.prepare, FORMAT)
