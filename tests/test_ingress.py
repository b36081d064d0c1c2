"""The client-facing gRPC port: clients of every vintage get the same streams (today's stubs, a client
generated from the .proto alone, no metadata), coalesced streams carry the same tokens in fewer messages,
and bytes that are not a request get INVALID_ARGUMENT while the service goes on serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from moe_service.client import Client
from moe_service.engine.engine import Engine
from moe_service.engine.sampling import SamplingParams
from moe_service.serving.local import start_service
from moe_service import load_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROMPT = [1, 17, 44, 9]
TOKENS = 24


@pytest.fixture(scope="module")
def service(ray_local):
    svc = start_service(dict(model="tiny", workers=2, gpus_per_worker=1.0, gateway_num_cpus=0, http_api=False,
                             expert_bind_host="127.0.0.1", sd_port=0, rebalance_interval_s=0))
    yield svc
    svc.shutdown()


@pytest.fixture(scope="module")
def want() -> list[int]:
    return Engine(load_model("tiny")).generate([PROMPT], SamplingParams(max_new_tokens=TOKENS, ignore_eos=True))[0].output


def test_every_stream_interval_carries_the_same_tokens_in_as_many_messages_as_it_says(service, want):
    from moe_service.transport.pb import moe_pb2, moe_pb2_grpc

    with grpc.insecure_channel(service.address) as ch:
        stub = moe_pb2_grpc.InferenceStub(ch)
        for interval in (0, 1, 4):
            req = moe_pb2.GenerateRequest(stream_interval=interval, params=moe_pb2.SamplingParams(
                max_new_tokens=TOKENS, ignore_eos=True))
            req.token_ids.ids.extend(PROMPT)
            messages = list(stub.Generate(req, timeout=60))
            tokens = [m.token_id for m in messages[:-1]] if interval == 0 else \
                [t.token_id for m in messages[:-1] for t in m.tokens]
            assert tokens == want, interval
            assert messages[-1].finish_reason == "length"
            if interval == 0:  # today's messages: one token each, in token_id
                assert len(messages) == TOKENS + 1 and not any(m.tokens for m in messages)
            if interval == 4:  # the first token at once, then a message per 4, the last one's id and all their text on it
                assert [len(m.tokens) for m in messages[:-1]] == [1] + [4] * ((TOKENS - 1) // 4) + [(TOKENS - 1) % 4]
                assert all(m.token_id == m.tokens[-1].token_id and m.text == "".join(t.text for t in m.tokens)
                           for m in messages[:-1])
    with Client(service.address) as client:  # today's client asks for interval 1, and gives tokens one by one
        assert client.generate_ids(PROMPT, max_new_tokens=TOKENS, ignore_eos=True) == want


GENERATED_CLIENT = """
import sys
import grpc
from grpc_tools import protoc
out, proto, address = sys.argv[1:4]
assert protoc.main(["protoc", "-I" + proto.rsplit("/", 1)[0], "--python_out=" + out, "--grpc_python_out=" + out, proto]) == 0
sys.path.insert(0, out)
import moe_pb2, moe_pb2_grpc
req = moe_pb2.GenerateRequest(params=moe_pb2.SamplingParams(max_new_tokens=int(sys.argv[5]), ignore_eos=True))
req.token_ids.ids.extend(int(t) for t in sys.argv[4].split(","))
with grpc.insecure_channel(address) as ch:
    print(" ".join(str(m.token_id) for m in moe_pb2_grpc.InferenceStub(ch).Generate(req, timeout=60) if m.token_id >= 0))
"""


def test_a_client_generated_from_the_proto_alone_needs_no_metadata(service, want, tmp_path):
    """Stubs made from protos/moe/v1/moe.proto by grpc_tools in a process of their own: nothing of this
    package imported, no metadata sent."""
    proto = ROOT / "protos" / "moe" / "v1" / "moe.proto"
    out = subprocess.run([sys.executable, "-c", GENERATED_CLIENT, str(tmp_path), str(proto), service.address,
                          ",".join(map(str, PROMPT)), str(TOKENS)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [int(t) for t in out.stdout.split()] == want


@pytest.mark.parametrize("method,kind", [("Generate", "unary_stream"), ("Forward", "unary_unary"),
                                         ("ModelInfo", "unary_unary")])
def test_bytes_that_are_not_a_request_get_invalid_argument(service, want, method, kind):
    with grpc.insecure_channel(service.address) as ch:
        call = getattr(ch, kind)(f"/moe.v1.Inference/{method}")  # raw bytes, no serializer
        with pytest.raises(grpc.RpcError) as err:
            result = call(b"\x0a\xff\xff\xff\x0f", timeout=30)
            list(result) if kind == "unary_stream" else result
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert f"does not parse as moe.v1.{method}Request" in err.value.details()
    with Client(service.address) as client:  # and everyone else is served
        assert client.generate_ids(PROMPT, max_new_tokens=TOKENS, ignore_eos=True) == want
