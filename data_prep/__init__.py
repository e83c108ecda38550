"""Data preparation: WebDataset shards in the version-1 sample schema.

- ``schema``: encode / decode / validate one sample (``decode_sample`` is the training side's decoder)
- ``writer``: ``ShardWriter`` (atomic ``<prefix>-%06d.tar`` shards plus ``index.json``), ``read_index``
- ``check``: ``python -m data_prep.check DIR``
- ``synthetic``: ``python -m data_prep.synthetic --out DIR --frames N [--seed S]``
- ``vkitti2``, ``kitti``, ``hypersim``: dataset converters (plumbing in ``convert``)
"""
