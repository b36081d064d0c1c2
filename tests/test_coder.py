"""The embedded `coder` checkpoint: transformers reads it with the same logits, its held-out loss is what its
training run recorded, served perplexity equals in-process (fp32) and bf16 stays within 1% of it, the
demo prompt continues as Python, and its experts specialise by token class."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_service import load_model
from moe_service.coder.train import CODER_DIR, corpus_files, encode_corpus, read
from moe_service.engine.engine import Engine
from moe_service.model.train import lm_loss
from moe_service.engine.sampling import SamplingParams
from moe_service.engine.tokenizer import load_tokenizer

RECORD = json.loads((CODER_DIR / "training.json").read_text())
SEQ = 256


@pytest.fixture(scope="module")
def coder():
    model = load_model("coder")
    return model, load_tokenizer("coder", model.args)


@pytest.fixture(scope="module")
def held_out(coder):
    """The held-out files as the training run encoded them, in windows of the training length."""
    _, tok = coder
    data = encode_corpus(tok.tok, read(corpus_files()[1]), 1, 2)
    n = len(data) // SEQ
    return data[: n * SEQ].view(n, SEQ).long()


def test_the_checkpoint_is_small_and_complete():
    size = sum(p.stat().st_size for p in CODER_DIR.glob("*.safetensors"))
    assert size <= 16 * 2**20, size
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "training.json", "mtp.safetensors",
            "draft.json"} <= {p.name for p in CODER_DIR.iterdir()}
    # the draft ships apart: the model's file holds no tensor of it, its file nothing but it
    from safetensors import safe_open

    with safe_open(CODER_DIR / "model.safetensors", "pt") as f:
        assert not any(k.startswith("model.layers.4.") for k in f.keys())
    with safe_open(CODER_DIR / "mtp.safetensors", "pt") as f:
        assert all(k.startswith("model.layers.4.") for k in f.keys())


def test_transformers_reads_the_checkpoint_with_the_same_logits(coder):
    from transformers import DeepseekV2ForCausalLM

    model, _ = coder
    hf = DeepseekV2ForCausalLM.from_pretrained(str(CODER_DIR), dtype=torch.float32).eval()
    ids = torch.randint(3, model.args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    assert (model(ids) - want).abs().max().item() <= 1e-4


def test_held_out_loss_is_the_recorded_one(coder, held_out):
    model, _ = coder
    with torch.no_grad():
        loss = sum(lm_loss(model(held_out[i : i + 8]), held_out[i : i + 8]).item() * len(held_out[i : i + 8])
                   for i in range(0, len(held_out), 8)) / len(held_out)
    # the shipped (bf16) weights' loss, recorded by the training run; a small margin for summation order
    assert loss <= RECORD["shipped_held_out_loss"] + 0.01, (loss, RECORD["shipped_held_out_loss"])


def test_the_draft_is_accepted_as_recorded(coder):
    """Teacher-forced on the held-out files, the shipped draft's top token is the model's as often as its
    training run recorded; speculating with it, greedy output is the model's own, several tokens a step."""
    from moe_service.coder.draft import RECORD_FILE, teacher_forced
    from moe_service.engine.scheduler import SchedulerConfig
    from moe_service.engine.speculative import Speculative

    record = json.loads((CODER_DIR / RECORD_FILE).read_text())
    model = load_model("coder", with_mtp=True)
    _, tok = coder
    held = encode_corpus(tok.tok, read(corpus_files()[1]), 1, 2)  # as the training run encoded them
    got = teacher_forced(model, held, SEQ, len(held))
    assert got["positions"] == record["teacher_forced"]["positions"]
    assert abs(got["acceptance"] - record["teacher_forced"]["acceptance"]) <= 0.005, got
    prompt = tok.encode("def fibonacci(n):")
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    plain = Engine(model, tok).generate([prompt], params)[0].output
    engine = Engine(model, tok, SchedulerConfig(max_running=1, max_seq_len=128), speculative=Speculative(2))
    seq = engine.add(prompt, params)
    steps = 0
    while engine.has_work:
        steps += engine.step().decode_rows
    assert seq.output == plain
    assert steps < 0.75 * len(plain), steps  # more than 1.33 tokens a step


def test_the_demo_prompt_continues_as_python(coder):
    model, tok = coder
    out = Engine(model, tok).generate([tok.encode("def fibonacci(n):")], SamplingParams(max_new_tokens=48))[0]
    text = out.text
    assert text.startswith("\n") and "    " in text, repr(text)  # a new, indented line: a function body
    assert any(w in text for w in ("return", "if ", "for ", "while ", '"""')), repr(text)


def test_experts_specialise_by_token_class(coder):
    from moe_service.coder.specialisation import CLASSES, held_out_sample, specialisation

    model, tok = coder
    r = specialisation(model, tok, held_out_sample(8000))
    assert set(r["layers"]) == set(model.args.moe_layers)
    for d in r["layers"].values():
        shares = torch.tensor(d["shares"])
        seen = [i for i, c in enumerate(CLASSES) if r["class_tokens"][c]]
        assert torch.allclose(shares[seen].sum(1), torch.ones(len(seen)), atol=1e-5)
        # not collapsed: every layer uses most of its experts, and no expert takes half the slots
        assert sum(s > 0.01 for s in d["expert_share"]) >= 0.75 * model.args.n_routed_experts
        assert max(d["expert_share"]) < 0.5
    # specialised: in some layer, two token classes route most of their slots to different experts
    # (total variation distance between their expert distributions)
    tv = max(0.5 * (torch.tensor(d["shares"][a]) - torch.tensor(d["shares"][b])).abs().sum().item()
             for d in r["layers"].values() for a in range(len(CLASSES)) for b in range(a)
             if r["class_tokens"][CLASSES[a]] and r["class_tokens"][CLASSES[b]])
    assert tv > 0.3, tv


@pytest.mark.slow
def test_served_perplexity_equals_in_process_and_bf16_is_within_one_percent(ray_local, coder, held_out):
    from moe_service.client import Client
    from moe_service.serving.local import start_service

    model, _ = coder
    windows = held_out[:16]
    with torch.no_grad():
        logits = torch.cat([model(windows[i : i + 8]) for i in range(0, len(windows), 8)])
    lp = logits[:, :-1].float().log_softmax(-1).gather(-1, windows[:, 1:, None]).squeeze(-1)
    in_process = math.exp(-lp.mean().item())
    served = {}
    for dtype in ("float32", "bfloat16"):
        svc = start_service(dict(model="coder", dtype=dtype, workers=2, gateway_num_cpus=0, sd_port=0,
                                 expert_bind_host="127.0.0.1", rebalance_interval_s=0))
        try:
            with Client(svc.address) as c:
                got = c.forward(windows[:, :-1].tolist(), targets=windows[:, 1:].tolist())
        finally:
            svc.shutdown()
        served[dtype] = math.exp(-float(got.mean()))
    assert abs(served["float32"] / in_process - 1) <= 1e-4, (served, in_process)
    assert abs(served["bfloat16"] / served["float32"] - 1) <= 0.01, served
