"""Helpers shared by the engine tests."""

import torch

from lmscale.engine import GenerationRequest, RequestParams
from lmscale.model import Transformer, preset


def tiny_model(name: str = "tiny") -> Transformer:
    """A tiny model with random weights, in fp32.

    NOTE: initialised with a large std: at the usual 0.02 a random model repeats one token
    forever, which would hide a wrong position or mask; at 0.5 each step's choice varies.
    """
    torch.manual_seed(0)
    return Transformer(preset(name, init_std=0.5)).eval()


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
    """Prompts of random ids, avoiding the special tokens (ids 0-2)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lengths]


def assert_same_greedy(model, prompt, got, want, tolerance=1e-3):
    """`got` equals `want`, or they part where the two best logits were a near-tie."""
    if got == want:
        return
    i = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    assert i is not None, f"one output is a prefix of the other: {got} vs {want}"
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + want[:i]]))[0, -1].float()
    top2 = logits.topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < tolerance, f"token {i} differs ({got[i]} vs {want[i]}) with a top-2 gap of {gap}"


def greedy(max_new_tokens=24, **kw):
    return RequestParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True, **kw)


def run_all(engine, prompts, params):
    """Every prompt submitted at once; the completions in submission order."""
    requests = [GenerationRequest(p, params, str(i)) for i, p in enumerate(prompts)]
    out = engine.generate(requests)
    return [out[str(i)] for i in range(len(prompts))]
