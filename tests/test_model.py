"""Models and adapters: flat vectors, common initialisation, stock-PEFT reload."""

import torch
from peft import PeftModel

from p2pfed.config import LoraSection, ModelSection
from p2pfed.model import adapter_to_vector, load_base, save_adapter, shared_parameters, tiny_model, tiny_tokenizer, vector_to_adapter, wrap_lora


def tiny_peft(seed=0, share="AB"):
    base, tokenizer = load_base(ModelSection(name="tiny"))
    return wrap_lora(base, LoraSection(r=4, alpha=8, share=share), seed), tokenizer


def test_vector_roundtrip_in_fixed_named_order():
    model, _ = tiny_peft()
    names = [n for n, _ in shared_parameters(model)]
    assert names == sorted(names) and all("lora_" in n for n in names)
    vector = torch.randn(adapter_to_vector(model).numel())
    vector_to_adapter(model, vector)
    assert torch.equal(adapter_to_vector(model), vector)


def test_same_seed_same_adapter_different_seed_different():
    a, _ = tiny_peft(seed=3)
    b, _ = tiny_peft(seed=3)
    c, _ = tiny_peft(seed=4)
    assert torch.equal(adapter_to_vector(a), adapter_to_vector(b))
    assert not torch.equal(adapter_to_vector(a), adapter_to_vector(c))


def test_share_b_freezes_a_and_sends_only_b():
    ab, _ = tiny_peft(share="AB")
    b, _ = tiny_peft(share="B")
    assert all("lora_B" in n for n, _ in shared_parameters(b))
    b_size = sum(p.numel() for n, p in shared_parameters(ab) if "lora_B" in n)
    assert adapter_to_vector(b).numel() == b_size < adapter_to_vector(ab).numel()


def test_saved_adapter_reloads_in_stock_peft(tmp_path):
    model, tokenizer = tiny_peft()
    vector_to_adapter(model, torch.randn(adapter_to_vector(model).numel()) * 0.1)
    save_adapter(model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_model(len(tiny_tokenizer())), tmp_path / "adapter")
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-6)
        with reloaded.disable_adapter():  # the adapter really changes the output
            assert not torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-4)


def test_tiny_tokenizer_roundtrips_any_text_and_has_chat_template():
    tokenizer = tiny_tokenizer()
    text = "Ünïcode, Shakespeare's 'tis — ok\n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in rendered


def test_local_hugging_face_directory_loads(tmp_path):
    tiny_model(len(tiny_tokenizer())).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    model, tokenizer = load_base(ModelSection(name=str(tmp_path / "m")))
    assert model.config.num_hidden_layers == 2 and tokenizer.pad_token is not None


def test_missing_model_is_one_clear_error(tmp_path):
    import pytest

    from p2pfed.model import ModelError

    with pytest.raises(ModelError, match="cannot load"):
        load_base(ModelSection(name=str(tmp_path / "nowhere")))
