"""The model core against transformers' DeepseekV2 and DeepseekV3 on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from moe_service import load_model
from moe_service.engine.engine import Engine
from moe_service.model.cache import PagedLatentCache
from moe_service.engine.sampling import SamplingParams
from tests.oracle import CONFIGS, V3_CONFIGS, write_checkpoint

TOL = 1e-4
ALL = {**{name: ("v2", c) for name, c in CONFIGS.items()}, **{name: ("v3", c) for name, c in V3_CONFIGS.items()}}


@pytest.fixture(scope="module", params=sorted(ALL))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    family, overrides = ALL[request.param]
    hf = write_checkpoint(path, overrides, family=family)
    return hf, load_model(path), request.param


def test_prefill_logits_match_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, ours.args.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    got = ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


def test_cached_decoding_equals_recomputation(pair):
    _, model, _ = pair
    V = model.args.vocab_size
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = PagedLatentCache.for_rows(model.args, rows=2, max_len=32)
    # prefill 9 tokens, a chunk of 5, then one token at a time
    got = [model(ids[:, :9], cache=cache)]
    got.append(model(ids[:, 9:14], cache=cache, start=torch.tensor([9, 9])))
    for t in range(14, 24):
        got.append(model(ids[:, t : t + 1], cache=cache, start=torch.tensor([t, t])))
    assert (torch.cat(got, dim=1) - full).abs().max().item() <= TOL


def test_padded_batch_equals_single_rows(pair):
    _, model, _ = pair
    V = model.args.vocab_size
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, V, (1, 11), generator=g), torch.randint(0, V, (1, 5), generator=g)
    batch = torch.zeros(2, 11, dtype=torch.long)
    batch[0], batch[1, :5] = a[0], b[0]
    got = model(batch, num_new=torch.tensor([11, 5]))
    assert (got[0] - model(a)[0]).abs().max().item() <= TOL
    assert (got[1, :5] - model(b)[0]).abs().max().item() <= TOL


def test_greedy_generation_is_token_identical(pair):
    hf, model, name = pair
    prompt = torch.randint(3, model.args.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 6:].tolist()
    got = Engine(model).generate([prompt[0].tolist()], SamplingParams(max_new_tokens=32, ignore_eos=True))[0]
    assert got.output == want, name
