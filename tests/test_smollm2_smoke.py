"""One smoke test on the real embedded model: SmolLM2-135M-Instruct from its GGUF cache."""

import pytest
import torch

from p2pfed.config import LoraSection, ModelSection, TrainSection
from p2pfed.model import adapter_to_vector, load_base, wrap_lora
from p2pfed.train import BlockSampler, LocalTrainer, evaluate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

VERSE = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
)


def test_embedded_model_loads_knows_english_and_trains_a_lora_step():
    base, tokenizer = load_base(ModelSection(name="smollm2-135m"))
    assert sum(p.numel() for p in base.parameters()) == pytest.approx(134.5e6, rel=0.01)
    model = wrap_lora(base, LoraSection(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), seed=0)
    ids = tokenizer(VERSE, return_tensors="pt").input_ids
    blocks = ids[:, :32].repeat(2, 1)
    before = evaluate(model, blocks, 2, torch.device("cpu"))
    assert before["ppl"] < 60  # a pretrained model, not random weights (random: ~49k)
    start = adapter_to_vector(model)
    trainer = LocalTrainer(model, TrainSection(lr=1e-3), BlockSampler(blocks, 2, seed=0), torch.device("cpu"))
    trainer.train(2)
    assert not torch.equal(adapter_to_vector(model), start)
    assert evaluate(model, blocks, 2, torch.device("cpu"))["loss"] < before["loss"]
