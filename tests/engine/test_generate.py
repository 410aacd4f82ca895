import torch

from lmscale.engine import SamplingParams, generate_ids, sample_next, stream_text
from lmscale.model import Transformer, preset


def model(family="tiny"):
    torch.manual_seed(0)
    return Transformer(preset(family)).eval()


def test_greedy_generation_matches_argmax_of_full_passes():
    for name in ("tiny", "tiny-gpt2"):
        m = model(name)
        prompt = [5, 17, 3, 99]
        got = list(generate_ids(m, prompt, SamplingParams(temperature=0, max_new_tokens=12)))
        seq = list(prompt)
        for _ in range(12):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert got == seq[len(prompt) :]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, SamplingParams(top_k=1)), greedy)
    assert torch.equal(sample_next(logits, SamplingParams(top_p=1e-6)), greedy)


def test_top_k_samples_only_among_the_k_best():
    logits = torch.randn(1, 100)
    best = set(logits[0].topk(5).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    draws = {
        int(sample_next(logits, SamplingParams(temperature=2.0, top_k=5), gen)) for _ in range(200)
    }
    assert draws <= best and len(draws) > 1


def test_seeded_sampling_is_reproducible_and_stops_at_stop_ids():
    m = model()
    params = SamplingParams(temperature=1.0, max_new_tokens=20, seed=7)
    first = list(generate_ids(m, [1, 2, 3], params))
    assert first == list(generate_ids(m, [1, 2, 3], params))
    cut = list(generate_ids(m, [1, 2, 3], params, stop_ids=[first[5]]))
    assert cut == first[: first.index(first[5])]


def test_generation_stops_when_the_context_is_full():
    m = model()
    out = list(generate_ids(m, list(range(120)), SamplingParams(temperature=0, max_new_tokens=50)))
    assert len(out) == 128 - 120


def test_stream_text_holds_back_split_characters_and_stop_strings():
    text = "héllo wörld END tail"
    data = text.encode()
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    pieces = list(stream_text(iter(data), decode, stop=["END"]))
    assert "".join(pieces) == "héllo wörld "
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(stream_text(iter(data), decode)) == text
