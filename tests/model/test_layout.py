import torch

from lmscale.model import Transformer, decode_layout_, preset


def test_decode_layout_keeps_values_ties_and_outputs():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    model.output.weight = model.tok_embeddings.weight  # tied, as SmolLM2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(tokens)
        decode_layout_(model)
        got = model(tokens)
    assert model.output.weight is model.tok_embeddings.weight
    assert not model.layers[0].attention.wq.weight.is_contiguous()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (got - expected).abs().max() <= 1e-5


def test_decode_layout_leaves_bfloat16_alone():
    model = Transformer(preset("tiny")).to(torch.bfloat16)
    decode_layout_(model)
    assert model.layers[0].attention.wq.weight.is_contiguous()
