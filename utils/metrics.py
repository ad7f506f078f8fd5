"""Training metrics summed on the device: no host read per step; one when they are logged."""

from collections import defaultdict

import torch


class DeviceMetrics:
    """Per mode ("train", "eval"): each metric's running sum, on the device, and its count, on the host.

    Evaluation gathers per-pair values with `gather_for_metrics`, which drops the samples that pad the last batch
    of an eval set that does not divide by the number of processes; per-batch values (0-d) are gathered from every
    rank. Training sums are reduced over ranks when read (`pop_means`)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.sums = {"train": {}, "eval": {}}
        self.counts = {"train": defaultdict(int), "eval": defaultdict(int)}

    def add(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        """Add a batch's metrics: per pair ([batch]) or one value for the batch (0-d)."""
        sums = self.sums[mode]
        for name, value in metrics.items():
            value = value.detach().float()
            if mode == "eval":
                gather = self.accelerator.gather_for_metrics if value.dim() else self.accelerator.gather
                value = gather(value if value.dim() else value[None])
            sums[name] = sums[name] + value.sum() if name in sums else value.sum()
            self.counts[mode][name] += value.numel()

    def means(self, mode: str) -> dict[str, float]:
        """Each metric's mean since the last `pop_means`, over all ranks (one device sync)."""
        sums, counts = self.sums[mode], self.counts[mode]
        if not sums:
            return {}
        totals = torch.stack([torch.stack(list(sums.values())),
                              torch.tensor([float(counts[name]) for name in sums], device=self.accelerator.device)])
        if mode == "train":  # evaluation gathered its values already
            totals = self.accelerator.reduce(totals, reduction="sum")
        return {name: total / count for name, (total, count) in zip(sums, totals.T.tolist())}

    def pop_means(self, mode: str) -> dict[str, float]:
        means = self.means(mode)
        self.sums[mode].clear()
        self.counts[mode].clear()
        return means
