"""p2pfed: serverless federated fine-tuning of LoRA adapters by gossip between torchrun peers."""

__version__ = "0.1.0"
