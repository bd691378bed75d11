"""Where a run's per-epoch numbers go besides metrics.jsonl: TensorBoard event files (`train.tensorboard: true`,
the `tensorboard` package) and Weights & Biases (`train.wandb_project: NAME`, the `wandb` package). Neither is a
dependency: asking for one that is not installed is one ConfigError at the start of the run, before any epoch.
Only the main process logs. Scalars are logged at step = epochs completed, so curves line up with metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from .config import Config, ConfigError


def required(cfg: Config) -> tuple:
    """(TensorBoard's SummaryWriter, the wandb module), each None where `cfg` does not ask for it; one ConfigError
    for one that is not installed. The trainer calls it before it writes anything into the run dir."""
    writer = wandb = None
    if cfg.train.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter as writer
        except ImportError:
            raise ConfigError(
                "train.tensorboard: true needs the tensorboard package: pip install tensorboard "
                "(or pip install -e '.[tensorboard]')"
            ) from None
    if cfg.train.wandb_project:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                f"train.wandb_project: {cfg.train.wandb_project} needs the wandb package: pip "
                "install wandb (and wandb login)"
            ) from None
    return writer, wandb


class EpochLoggers:
    def __init__(
        self, cfg: Config, out: Path, config: dict, main: bool, reference: str | None = None, resumed: bool = False
    ):
        self.tb = self.wandb = None
        if not main:
            return
        writer, wandb = required(cfg)
        if writer is not None:
            self.tb = writer(log_dir=str(out / "tensorboard"))
        if wandb is not None:
            from .rundir import wandb_id

            # A resumed run continues its W&B run (the id its run dir recorded); a fresh one starts a new one.
            self.wandb = wandb.init(
                project=cfg.train.wandb_project,
                name=out.name,
                id=wandb_id(out, resumed),
                resume="allow",
                dir=str(out),
                config={**config, "reference": reference},
            )

    def log(self, row: dict) -> None:
        scalars = {
            k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"
        }
        step = row["epoch"] + 1
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
