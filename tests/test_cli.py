"""The command line: what `moe-service serve` asks Ray for, from the GPUs there are; `generate`'s --n,
--logprobs and --request-id, in-process and (through a fake client) from a service."""

from __future__ import annotations

import re

import pytest
import ray
import torch

from moe_service.cli import build_parser, main
from moe_service.cli.serve import _service_config


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this host has n CUDA devices."""
    def set_gpus(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_gpus


@pytest.mark.parametrize("host_gpus,workers,share", [(0, 2, 0.0), (1, 2, 0.3333), (2, 2, 0.5), (3, 2, 1.0),
                                                     (8, 2, 1.0), (1, 1, 0.5), (2, 4, 0.3333)])
def test_the_local_default_shares_the_gpus_that_exist(gpus, host_gpus, workers, share):
    gpus(host_gpus)
    cfg = _service_config(_serve_args("--workers", str(workers)))
    assert cfg["gpus_per_worker"] == cfg["gateway_gpus"] == share
    # Ray can place every actor: each GPU holds whole actors of `share` each
    if share:
        per_gpu = int(1 / share + 1e-9) if share < 1 else 1
        assert per_gpu * host_gpus >= workers + 1 and per_gpu * share <= 1.0


def test_explicit_settings_win(gpus):
    gpus(1)
    cfg = _service_config(_serve_args("--gpus-per-worker", "0.25", "--gateway-gpus", "0.5"))
    assert (cfg["gpus_per_worker"], cfg["gateway_gpus"]) == (0.25, 0.5)
    cfg = _service_config(_serve_args("--gpus-per-worker", "0"))
    assert (cfg["gpus_per_worker"], cfg["gateway_gpus"]) == (0.0, 0.3333)


def test_speculative_reaches_the_service_config(gpus):
    gpus(0)
    assert "speculative" not in _service_config(_serve_args())
    assert _service_config(_serve_args("--speculative", "2"))["speculative"] == {"method": "mtp", "tokens": 2}


def test_on_a_cluster_the_clusters_gpus_count_not_this_hosts(gpus, monkeypatch):
    gpus(0)  # the CLI's own host has none; the cluster does
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    cfg = _service_config(_serve_args("--ray-address", "auto", "--workers", "4"))
    assert cfg["gpus_per_worker"] == cfg["gateway_gpus"] == 1.0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
    cfg = _service_config(_serve_args("--ray-address", "auto"))
    assert cfg["gpus_per_worker"] == cfg["gateway_gpus"] == 0.0


def test_a_cluster_with_too_few_gpus_asks_for_the_settings(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 2.0})
    with pytest.raises(ValueError, match="--gpus-per-worker and --gateway-gpus"):
        _service_config(_serve_args("--ray-address", "auto", "--workers", "2"))
    cfg = _service_config(_serve_args("--ray-address", "auto", "--gpus-per-worker", "0.5", "--gateway-gpus", "1"))
    assert (cfg["gpus_per_worker"], cfg["gateway_gpus"]) == (0.5, 1.0)


# generate: --n, --logprobs, --request-id

PROMPT = [1, 5, 9, 13]
GEN = ["generate", "--preset", "tiny", "--token-ids", " ".join(map(str, PROMPT)), "--max-new-tokens", "6",
       "--temperature", "1.0", "--ids"]


def _run(capsys, *argv: str):
    assert main([*GEN, *argv]) == 0
    return capsys.readouterr()


def _ids(out: str) -> list[int]:
    return [int(t) for t in out.split()]


def _samples(out: str) -> dict[int, list[int]]:
    """With --n > 1 each sample is one line `[i] ID ID ...`."""
    lines = [re.fullmatch(r"\[(\d+)\] ?([\d ]*)", line) for line in out.splitlines()]
    assert all(lines), out
    return {int(m[1]): _ids(m[2]) for m in lines}


def test_generate_n_samples_are_the_seeded_runs_of_seed_plus_i(capsys):
    samples = _samples(_run(capsys, "--n", "3", "--seed", "7").out)
    assert sorted(samples) == [0, 1, 2]
    assert len({tuple(s) for s in samples.values()}) == 3, samples  # seeded samples differ from each other
    assert samples[0] == _ids(_run(capsys, "--seed", "7").out)  # sample 0 is the plain seeded run
    for i in (1, 2):  # sample i is the run with seed + i
        assert samples[i] == _ids(_run(capsys, "--seed", str(7 + i)).out)


def _logprob_lines(err: str, index: int = 0) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """`[i] ID: LOGPROB | top: ID: LOGPROB, ...` lines (--ids: no token text)."""
    rows = []
    for line in err.splitlines():
        m = re.fullmatch(rf"\[{index}\] (\d+): (\S+)(?: \| top: (.*))?", line)
        if m:
            top = [(int(t), float(v)) for t, v in re.findall(r"(\d+): ([^,\s]+)", m[3] or "")]
            rows.append((int(m[1]), float(m[2]), top))
    return rows


def test_generate_logprobs_are_the_models_log_softmax(capsys):
    from moe_service.checkpoint import load_model

    r = _run(capsys, "--seed", "3", "--logprobs", "3")
    out = _ids(r.out)
    rows = _logprob_lines(r.err)
    assert [t for t, _, _ in rows] == out and len(out) >= 1, r.err  # one line per generated token
    with torch.no_grad():
        lp = load_model("tiny")(torch.tensor([PROMPT + out]))[0].float().log_softmax(-1)
    for step, (tok, logprob, top) in enumerate(rows):
        row = lp[len(PROMPT) - 1 + step]
        assert logprob == pytest.approx(row[tok].item(), abs=1e-3)
        assert len(top) == 3
        assert [t for t, _ in top] == row.topk(3).indices.tolist()
        assert [v for _, v in top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-3)
    # with n > 1 every sample's tokens carry theirs, tagged with its index
    r = _run(capsys, "--n", "2", "--seed", "3", "--logprobs", "0")
    samples = _samples(r.out)
    assert samples[0] == out
    for i in (0, 1):
        rows = _logprob_lines(r.err, i)
        assert [t for t, _, _ in rows] == samples[i] and all(top == [] for _, _, top in rows)


@pytest.mark.parametrize("argv,message", [
    (["--request-id", "r1"], "--request-id needs --address"),
    (["--n", "0"], "--n must be in [1, 16]"),
    (["--n", "17"], "--n must be in [1, 16]"),
    (["--logprobs", "21"], "--logprobs must be in [0, 20]"),
    (["--logprobs", "-1"], "--logprobs must be in [0, 20]"),
])
def test_generate_refuses_what_the_service_would(capsys, argv, message):
    assert main([*GEN, *argv]) == 2
    assert message in capsys.readouterr().err


def test_generate_from_a_service_passes_n_logprobs_and_request_id(capsys, monkeypatch):
    import moe_service.client
    from moe_service.client import Token

    calls = []

    class FakeClient:
        def __init__(self, address, api_key=None, **kwargs):
            self.address = address

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def generate(self, prompt=None, token_ids=None, params=None, n=1, request_id="", **kwargs):
            calls.append({"address": self.address, "prompt": prompt, "token_ids": token_ids, "params": params,
                          "n": n, "request_id": request_id})
            rid = request_id or "made-up"
            usage = {"prompt_tokens": 2, "generated_tokens": 1}
            yield Token(7, "a", index=0, logprob=-0.5, top_logprobs=[(7, -0.5), (8, -1.25)], request_id=rid)
            yield Token(9, "b", index=1, logprob=-2.0, top_logprobs=[(9, -2.0), (7, -0.75)], request_id=rid)
            yield Token(-1, "", "length", usage, index=1, request_id=rid)
            yield Token(10, "c", index=0, logprob=-0.25, top_logprobs=[(10, -0.25), (3, -3.0)], request_id=rid)
            yield Token(-1, "", "stop", usage, index=0, request_id=rid)

    monkeypatch.setattr(moe_service.client, "Client", FakeClient)
    assert main(["generate", "--address", "svc:9000", "--n", "2", "--logprobs", "2", "--request-id", "r1",
                 "--seed", "5", "--temperature", "0.5", "hello"]) == 0
    (call,) = calls
    assert (call["address"], call["prompt"], call["n"], call["request_id"]) == ("svc:9000", "hello", 2, "r1")
    assert (call["params"].logprobs, call["params"].seed, call["params"].temperature) == (2, 5, 0.5)
    r = capsys.readouterr()
    assert r.out.splitlines() == ["[1] b", "[0] ac"]  # each sample at its end, told apart by its index
    assert "[request_id: r1]" in r.err
    assert _logprob_lines(r.err, 0) == [(7, -0.5, [(7, -0.5), (8, -1.25)]), (10, -0.25, [(10, -0.25), (3, -3.0)])]
    assert _logprob_lines(r.err, 1) == [(9, -2.0, [(9, -2.0), (7, -0.75)])]
    assert "[1] finish: length" in r.err and "[0] finish: stop" in r.err

    # one sample, no logprobs: streamed text as before; token ids reach the client; the made-up id is echoed
    calls.clear()
    assert main(["generate", "--address", "svc:9000", "--token-ids", "1 2", "--ids"]) == 0
    assert (calls[0]["token_ids"], calls[0]["n"], calls[0]["request_id"], calls[0]["params"].logprobs) == \
        ([1, 2], 1, "", None)
    r = capsys.readouterr()
    assert _ids(r.out) == [7, 9, 10] and "[request_id: made-up]" in r.err
