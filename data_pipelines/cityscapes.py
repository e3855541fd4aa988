"""Cityscapes, 3 tasks (19-class segmentation, 10-class part segmentation, disparity),
auto-lambda preprocessing.

Expected files (``data_dir`` is the folder holding ``train`` and ``val``; 256x512 in
the real set)::

    data_dir/{train,val}/image/{i}.npy     float (256, 512, 3) in [0, 1]
    data_dir/{train,val}/label_19/{i}.npy  (256, 512) integers 0..18, -1 ignore
    data_dir/{train,val}/part_seg/{i}.npy  (256, 512) integers 0..9, -1 ignore
    data_dir/{train,val}/depth/{i}.npy     float (256, 512, 1), disparity, -1 invalid

``make_dataset(data_dir, split, batch_size, *, augment=None, seed=0, epoch=0,
start_step=0, ...)`` yields dicts of numpy arrays:

    image     float32 (B, H, W, 3) in [-1, 1]
    seg       int32   (B, H, W), -1 ignore
    part_seg  int32   (B, H, W), -1 ignore
    disp      float32 (B, H, W, 1), -1 invalid
    index     int64   (B,)

See ``data_pipelines.scenes`` for preparation, ordering, resume, shards and augmentation.
"""

from __future__ import annotations

import functools

from data_pipelines import scenes

FORMAT = scenes.CITYSCAPES
make_dataset = functools.partial(scenes.make_dataset, FORMAT)
open_source = functools.partial(scenes.SceneSource, FORMAT)
prepare = functools.partial(scenes.prepare, FORMAT)
