"""Lightning wiring of the shard pipeline in data.py."""
from __future__ import annotations

import sys

import lightning.pytorch as pl

from curriculum.data import (
    DataError, TrainSpec, TrainStream, ValStream, check_readers, expand_shards, shard_sample_counts, train_loader,
    uneven_split_note, val_loader,
)


def _shards(data_cfg: dict, key: str) -> list[str]:
    try:
        return expand_shards(data_cfg[key])
    except DataError as exc:
        raise DataError(f"data.{key}: {exc}") from None


class DepthDataModule(pl.LightningDataModule):
    def __init__(self, data_cfg: dict, seed: int):
        super().__init__()
        self.cfg, self.seed = data_cfg, seed
        self.train_urls, self.val_urls = (_shards(data_cfg, key) for key in ("train_shards", "val_shards"))
        try:
            self.shard_counts = shard_sample_counts(self.train_urls)
        except DataError:  # an index.json that does not list every shard: what epoch_samples is for
            if not data_cfg["epoch_samples"]:
                raise
            self.shard_counts = None
        total = data_cfg["epoch_samples"] or (sum(self.shard_counts) if self.shard_counts is not None else 0)
        if not total:
            raise DataError(
                f"data.train_shards '{data_cfg['train_shards']}': no index.json beside the shards; "
                "set data.epoch_samples to the number of samples per epoch"
            )
        self.epoch_samples = int(total)

    def batches_per_rank(self, world_size: int) -> int:
        n = self.epoch_samples // (world_size * self.cfg["batch_size"])
        if n < 1:
            raise DataError(
                f"data.batch_size: {self.epoch_samples} samples per epoch are fewer than one batch of "
                f"{self.cfg['batch_size']} on each of {world_size} ranks"
            )
        return n

    def setup(self, stage: str) -> None:
        # Rank and world size come from the trainer in the main process: loader workers read them
        # from env vars that Lightning's launcher does not all set.
        rank, world = self.trainer.global_rank, self.trainer.world_size
        workers = self.cfg["num_workers"]
        if stage == "fit":
            check_readers(len(self.train_urls), world, workers, "data.train_shards", self.cfg["train_shards"])
            note = uneven_split_note(self.train_urls, self.shard_counts, self.seed, world, workers,
                                     self.cfg["batch_size"], self.batches_per_rank(world), "data.train_shards")
            if note and rank == 0:
                print(note, file=sys.stderr, flush=True)
            spec = TrainSpec(
                batch_size=self.cfg["batch_size"], batches_per_rank=self.batches_per_rank(world),
                crop_height=self.cfg["crop_height"], crop_width=self.cfg["crop_width"],
                scale_jitter=self.cfg["scale_jitter"], hflip=self.cfg["hflip"], color_jitter=self.cfg["color_jitter"],
                shuffle_buffer=self.cfg["shuffle_buffer"], max_bad_samples=self.cfg["max_bad_samples"],
                device_resize=self.cfg["device_resize"],
            )
            self.train_stream = TrainStream(self.train_urls, spec, rank, world, self.seed)
        self.val_stream = ValStream(
            self.val_urls, rank, world, self.cfg["val_batch_size"], self.cfg["val_height"], self.cfg["val_width"],
            max_images=self.cfg["val_max_images"], max_bad_samples=self.cfg["max_bad_samples"],
        )

    def train_dataloader(self):
        # The trained batches' stream positions live in the module (noted per step, kept in checkpoints).
        return train_loader(self.train_stream, lambda: self.trainer.global_step, self.cfg["num_workers"],
                            resume_fn=lambda: self.trainer.lightning_module.stream_positions.resume())

    def val_dataloader(self):
        return val_loader(self.val_stream, min(self.cfg["num_workers"], 1))
