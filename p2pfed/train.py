"""Local optimisation and evaluation on one peer's blocks.

The optimizer state stays local: gossip replaces the adapter weights, never Adam's moments.
"""

from __future__ import annotations

import math

import torch
from peft import PeftModel

from p2pfed.config import TrainSection


class BlockSampler:
    """Endless shuffled passes over the training blocks, seeded per (run seed, rank)."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int) -> None:
        self.blocks = blocks
        self.batch_size = min(batch_size, blocks.shape[0])
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.clone()}

    def restore(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"]

    def next_batch(self) -> torch.Tensor:
        if self.order.numel() < self.batch_size:
            self.order = torch.randperm(self.blocks.shape[0], generator=self.generator)
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return self.blocks[batch]


class LocalTrainer:
    """AdamW on the trainable adapter parameters, linear warm-up, gradient clipping."""

    def __init__(self, model: PeftModel, section: TrainSection, sampler: BlockSampler, device: torch.device) -> None:
        self.model = model
        self.section = section
        self.sampler = sampler
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=section.lr, weight_decay=section.weight_decay)
        warmup = max(1, section.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))

    def step(self) -> float:
        """One optimizer step on the next batch; returns its loss."""
        self.model.train()
        batch = self.sampler.next_batch().to(self.device)
        loss = self.model(input_ids=batch, labels=batch).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.section.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.section.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def state(self) -> dict:
        """Everything local training needs to continue bit for bit after a restart."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state()}

    def restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.restore(state["sampler"])

    def train(self, steps: int) -> float | None:
        """`steps` local steps; returns their mean loss (None for none: a gossip-only round).
        With optimizer_state = 'reset' they start from fresh AdamW moments (the schedule's
        step count goes on)."""
        if steps == 0:
            return None
        if self.section.optimizer_state == "reset":
            self.optimizer.state.clear()
        return sum(self.step() for _ in range(steps)) / steps


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over `blocks`."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        count = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * count
        tokens += count
    mean = total / max(tokens, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0))}
