"""The wire: codec, generated code, the expert gRPC server on loopback, the async client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moe_service import load_model
from moe_service.checkpoint import load_experts
from moe_service.model.experts import RoutedExperts
from moe_service.transport import fastwire
from moe_service.transport.codec import CodecError, decode, decode_bytes, encode
from moe_service.transport.expert_client import ExpertClient
from moe_service.serving.worker.servicer import ExpertServicer, HostedLayer
from moe_service.transport.server import start_expert_server
from moe_service.transport.pb import moe_pb2, moe_pb2_grpc
from tests.aio import LoopThread

ROOT = Path(__file__).resolve().parents[1]
PRESET = "tiny"


# ---- codec --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64])
def test_codec_round_trip_is_exact(dtype):
    t = (torch.randn(7, 5) * 1000).to(dtype)
    msg = encode(t)
    assert msg.dtype == str(dtype).removeprefix("torch.") and list(msg.shape) == [7, 5]
    back = decode(msg)
    assert back.dtype == dtype and torch.equal(back, t)


def test_decode_does_not_copy():
    data = encode(torch.arange(1024, dtype=torch.float32)).data
    t = decode_bytes("float32", [32, 32], data)
    assert t.data_ptr() == np.frombuffer(data, dtype=np.uint8).ctypes.data  # a view of the bytes


def test_codec_rejects_bad_messages():
    with pytest.raises(CodecError, match=r"hidden has 12 bytes; float32 x \[2, 2\] needs 16"):
        decode(moe_pb2.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 12), "hidden")
    with pytest.raises(CodecError, match="x.dtype is 'float64'"):
        decode(moe_pb2.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "x")
    with pytest.raises(CodecError, match="shape"):
        decode(moe_pb2.Tensor(dtype="float32", shape=[-1], data=b""), "x")
    with pytest.raises(CodecError, match="cannot be sent"):
        encode(torch.zeros(2, dtype=torch.float64))


def test_generated_code_matches_protos():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- servers on loopback ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return load_model(PRESET)


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


def split_experts(model, num_workers: int, replicate: dict[int, list[int]] | None = None):
    """Expert e of every MoE layer on worker e % W, plus extra replicas: {expert: [workers]}."""
    args = model.args
    hosts: dict[int, list[tuple[int, int]]] = {w: [] for w in range(num_workers)}
    replicas: dict[int, list[list[int]]] = {}
    for layer in args.moe_layers:
        replicas[layer] = []
        for e in range(args.n_routed_experts):
            ws = [e % num_workers] + [w for w in (replicate or {}).get(e, []) if w != e % num_workers]
            replicas[layer].append(ws)
            for w in ws:
                hosts[w].append((layer, e))
    return hosts, replicas


async def start_workers(hosts, max_message_bytes=64 << 20, servicer_class=ExpertServicer):
    args = load_model(PRESET).args
    servers = {}
    for w, pairs in hosts.items():
        hosted = {l: HostedLayer.build(m, ids, args.n_routed_experts) for l, (m, ids) in load_experts(PRESET, pairs).items()}
        servicer = servicer_class(hosted, worker_id=f"w{w}", hidden_size=args.hidden_size,
                                  num_experts=args.n_routed_experts,
                                  max_message_bytes=max_message_bytes)
        servers[w] = await start_expert_server(servicer)
    return servers


@pytest.fixture(scope="module")
def one_worker(loop, model):
    hosts, _ = split_experts(model, 1)
    servers = loop.run(start_workers(hosts, max_message_bytes=256 << 10))
    yield servers[0]
    loop.run(servers[0].stop(0))


def layer_inputs(model, T: int, seed: int = 0):
    layer = model.args.moe_layers[0]
    x = torch.randn(T, model.args.hidden_size, generator=torch.Generator().manual_seed(seed))
    w, e = model.layers[layer].mlp.gate(x)
    return layer, x, w, e


# ---- bad input: the right status, a message naming the field, and the server keeps serving ------

def good_request(model, layer=None, T=4):
    layer_, x, w, e = layer_inputs(model, T)
    req = moe_pb2.RunExpertsRequest(layer=layer_ if layer is None else layer)
    encode(x, req.hidden)
    encode(e.to(torch.int32), req.experts)
    encode(w, req.weights)
    return req


def bad_requests(model):
    D = model.args.hidden_size

    def edit(fn):
        req = good_request(model)
        fn(req)
        return req

    nan = torch.randn(4, D)
    nan[1, 3] = float("nan")
    inf_w = torch.rand(4, model.args.num_experts_per_tok)
    inf_w[0, 0] = float("inf")
    return {
        "unknown layer": (edit(lambda r: setattr(r, "layer", 0)), "layer 0 is not hosted"),
        "unknown expert": (edit(lambda r: encode(torch.full((4, 4), 99, dtype=torch.int32), r.experts)), "experts has id 99"),
        "shape mismatch": (edit(lambda r: encode(torch.randn(4, D + 1), r.hidden)), "hidden has shape"),
        "rows mismatch": (edit(lambda r: encode(torch.zeros(3, 4, dtype=torch.int32), r.experts)), "experts has shape"),
        "weights shape": (edit(lambda r: encode(torch.zeros(4, 3), r.weights)), "weights has shape"),
        "dtype": (edit(lambda r: encode(torch.zeros(4, D, dtype=torch.int64), r.hidden)), "hidden has dtype"),
        "truncated bytes": (edit(lambda r: setattr(r.hidden, "data", r.hidden.data[:-3])), "hidden has"),
        "unknown dtype": (edit(lambda r: setattr(r.weights, "dtype", "float64")), "weights.dtype"),
        "nan": (edit(lambda r: encode(nan, r.hidden)), "hidden contains NaN or Inf"),
        "inf weight": (edit(lambda r: encode(inf_w, r.weights)), "weights contains NaN or Inf"),
        "empty batch": (edit(lambda r: (encode(torch.zeros(0, D), r.hidden), encode(torch.zeros(0, 4, dtype=torch.int32), r.experts),
                                        encode(torch.zeros(0, 4), r.weights))), "hidden is empty"),
    }


def test_bad_requests_get_invalid_argument_and_server_keeps_serving(loop, model, one_worker):
    async def go():
        async with grpc.aio.insecure_channel(one_worker.address) as ch:
            stub = moe_pb2_grpc.ExpertStub(ch)
            for name, (req, words) in bad_requests(model).items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.RunExperts(req, timeout=10)
                # a layer or expert the worker does not host is a stale placement, not bad input
                want = grpc.StatusCode.FAILED_PRECONDITION if "not hosted" in words else grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.code() == want, name
                assert words in err.value.details(), (name, err.value.details())
                ok = await stub.RunExperts(good_request(model), timeout=10)
                assert list(ok.output.shape) == [4, model.args.hidden_size], name
    loop.run(go())


def test_large_finite_half_precision_is_accepted(loop, model, one_worker):
    """The NaN/Inf check sums in the tensor's own dtype; an fp16 sum that overflows while every
    element is finite must not be mistaken for bad input."""
    layer, _, w, e = layer_inputs(model, 4)
    x = torch.full((4, model.args.hidden_size), 60000.0, dtype=torch.float16)  # sum overflows fp16
    assert not torch.isfinite(x.sum()) and torch.isfinite(x).all()
    client = ExpertClient()
    try:
        out, _ = loop.run(client.run(one_worker.address, layer, x, e.to(torch.int32), w, timeout=10))
        assert out.dtype == torch.float16 and out.shape == x.shape
    finally:
        loop.run(client.close())


def test_nan_in_a_large_dispatch_is_rejected_and_the_server_keeps_serving(loop):
    """A large hidden is summed for NaN/Inf while the experts run (on a thread) or just before them
    (inline, a few rows): both answer INVALID_ARGUMENT, and a good request after each is served."""
    D = 8192  # 2 rows of fp32 make a large message, so the inline path sees one too
    experts = RoutedExperts(2, D, 4)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    servicer = ExpertServicer({1: HostedLayer.build(experts, [0, 1], 2)}, worker_id="w", hidden_size=D,
                              num_experts=2)
    server = loop.run(start_expert_server(servicer))
    client = ExpertClient()
    try:
        for rows in (2, 300):  # inline, and on the compute thread
            x = torch.randn(rows, D)
            e = torch.tensor([[0, 1]] * rows, dtype=torch.int32)
            w = torch.full((rows, 2), 0.5)
            assert x.nbytes >= fastwire.SMALL_MESSAGE
            bad = x.clone()
            bad[rows - 1, 5] = float("inf")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                loop.run(client.run(server.address, 1, bad, e, w, timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rows
            assert "hidden contains NaN or Inf" in err.value.details()
            out, _ = loop.run(client.run(server.address, 1, x, e, w, timeout=30))
            assert torch.equal(out, experts(x, w, e.long()))
    finally:
        loop.run(client.close())
        loop.run(server.stop(0))


def test_oversized_message_gets_resource_exhausted(loop, model, one_worker):
    async def go():
        async with grpc.aio.insecure_channel(one_worker.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = moe_pb2_grpc.ExpertStub(ch)
            big = good_request(model, T=2048)  # 2048 x 64 fp32 = 512 KiB > the server's 256 KiB
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RunExperts(big, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            ok = await stub.RunExperts(good_request(model), timeout=10)  # and the server serves the next one
            layer, x, w, e = layer_inputs(model, 4)
            assert (decode(ok.output) - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
    loop.run(go())


def test_client_honours_deadlines(loop, model, one_worker):
    client = ExpertClient()
    # enough rows that the answer takes milliseconds: gRPC's deadline timer is coarse, and a
    # few-row call answered within its tick is delivered although it was late (about 1 in 15)
    layer, x, w, e = layer_inputs(model, 800)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        loop.run(client.run(one_worker.address, layer, x, e.to(torch.int32), w, timeout=1e-6))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    loop.run(client.close())


def test_health_describe_and_reflection(loop, model, one_worker):
    async def go():
        async with grpc.aio.insecure_channel(one_worker.address) as ch:
            h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="moe.v1.Expert"))
            assert h.status == health_pb2.HealthCheckResponse.SERVING
            d = await moe_pb2_grpc.ExpertStub(ch).Describe(moe_pb2.DescribeRequest())
            pairs = {(s.layer, s.expert) for s in d.hosted}
            assert pairs == {(l, e) for l in model.args.moe_layers for e in range(model.args.n_routed_experts)}
            assert d.worker_id == "w0" and d.max_message_bytes == 256 << 10
            stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            async for resp in stream:
                names = {s.name for s in resp.list_services_response.service}
                break
            assert {"moe.v1.Expert", "grpc.health.v1.Health"} <= names
            await one_worker.set_serving(False)
            h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert h.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await one_worker.set_serving(True)
    loop.run(go())


# ---- TLS on the internal channel -----------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost (openssl CLI)."""
    d = tmp_path_factory.mktemp("tls")
    run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
        "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-extfile", "san.ext", "-out", "server.crt")
    # a gateway's client certificate from the same CA, and one from a CA the workers do not trust
    for name, ca in (("client", "ca"), ("stranger", "other-ca")):
        if not (d / f"{ca}.crt").exists():
            run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={ca}",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "1", "-out", f"{name}.crt")
    return d


def test_tls_on_the_expert_channel(loop, model, certs):
    from moe_service.transport.options import TLSConfig

    hosts, replicas = split_experts(model, 1)
    args = model.args
    hosted = {l: HostedLayer.build(m, ids, args.n_routed_experts) for l, (m, ids) in load_experts(PRESET, hosts[0]).items()}
    servicer = ExpertServicer(hosted, worker_id="tls", hidden_size=args.hidden_size,
                              num_experts=args.n_routed_experts)
    server_tls = TLSConfig(cert_file=str(certs / "server.crt"), key_file=str(certs / "server.key"))
    server = loop.run(start_expert_server(servicer, tls=server_tls))
    layer, x, w, e = layer_inputs(model, 8)
    try:
        secure = ExpertClient(tls=TLSConfig(ca_file=str(certs / "ca.crt")))
        out, _ = loop.run(secure.run(server.address, layer, x, e.to(torch.int32), w, timeout=10))
        assert (out - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5
        loop.run(secure.close())
        plain = ExpertClient()  # a client without TLS cannot talk to it
        with pytest.raises(grpc.aio.AioRpcError) as err:
            loop.run(plain.run(server.address, layer, x, e.to(torch.int32), w, timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        loop.run(plain.close())
    finally:
        loop.run(server.stop(0))


def test_mutual_tls_refuses_clients_without_a_trusted_certificate(loop, model, certs):
    """With a CA configured the worker requires a client certificate from it: a gateway without one, or
    with one from another CA, is refused at the handshake, and no expert runs for it."""
    from moe_service.transport.options import TLSConfig

    hosts, _ = split_experts(model, 1)
    args = model.args
    hosted = {l: HostedLayer.build(m, ids, args.n_routed_experts) for l, (m, ids) in load_experts(PRESET, hosts[0]).items()}
    ran = []
    servicer = ExpertServicer(hosted, worker_id="mtls", hidden_size=args.hidden_size, num_experts=args.n_routed_experts,
                              on_call=lambda *a: ran.append(a))
    server = loop.run(start_expert_server(servicer, tls=TLSConfig(str(certs / "server.crt"), str(certs / "server.key"),
                                                                  str(certs / "ca.crt"))))
    layer, x, w, e = layer_inputs(model, 4)
    try:
        for who, tls in (("no certificate", TLSConfig(ca_file=str(certs / "ca.crt"))),
                         ("another CA's certificate", TLSConfig(str(certs / "stranger.crt"), str(certs / "stranger.key"),
                                                                str(certs / "ca.crt")))):
            client = ExpertClient(tls=tls)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                loop.run(client.run(server.address, layer, x, e.to(torch.int32), w, timeout=5))
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED), who
            loop.run(client.close())
        assert not ran, "an expert ran for a client the worker does not trust"
        trusted = ExpertClient(tls=TLSConfig(str(certs / "client.crt"), str(certs / "client.key"), str(certs / "ca.crt")))
        out, _ = loop.run(trusted.run(server.address, layer, x, e.to(torch.int32), w, timeout=10))
        assert (out - model.layers[layer].mlp.experts(x, w, e)).abs().max().item() <= 1e-5 and len(ran) == 1
        loop.run(trusted.close())
    finally:
        loop.run(server.stop(0))


# ---- fastwire: protobuf bytes without protobuf's copies --------------------------------------------

@pytest.mark.parametrize("path", ["small", "large"])
def test_fastwire_writes_the_bytes_protobuf_writes_and_reads_what_it_reads(path: str, monkeypatch):
    # both paths on the same message: protobuf's C code (small) and the zero-copy reader/writer (large)
    monkeypatch.setattr(fastwire, "SMALL_MESSAGE", 1 << 30 if path == "small" else 0)
    h = torch.randn(5, 8).bfloat16()
    e = torch.randint(-1, 4, (5, 3), dtype=torch.int32)
    w = torch.rand(5, 3)
    ref = moe_pb2.RunExpertsRequest(layer=3)
    encode(h, ref.hidden)
    encode(e, ref.experts)
    encode(w, ref.weights)
    assert fastwire.encode_request(3, h, e, w) == ref.SerializeToString()
    # rows of a bigger hidden: gathered straight into the message (large) or first (small), same bytes
    big = torch.randn(9, 8).bfloat16()
    rows = torch.tensor([4, 0, 8, 8, 2])
    assert fastwire.encode_request(3, big, e, w, rows) == fastwire.encode_request(3, big[rows], e, w)
    got = fastwire.decode_request(ref.SerializeToString())
    assert got.error is None and got.layer == 3
    assert torch.equal(got.hidden.tensor(), h) and torch.equal(got.experts.tensor(), e)
    assert torch.equal(got.weights.tensor(), w)
    resp = moe_pb2.RunExpertsResponse.FromString(fastwire.encode_response(h, 0.5))
    assert resp.compute_seconds == 0.5 and torch.equal(decode(resp.output), h)
    # a response written in place reads as the same protobuf
    buf = fastwire.ResponseBuffer(tuple(h.shape), h.dtype)
    buf.output.copy_(h)
    message = buf.finish(0.25)
    assert message == fastwire.encode_response(h, 0.25)
    got_resp = fastwire.decode_response(message)
    assert got_resp.compute_seconds == 0.25 and torch.equal(got_resp.output, h)
    # on a stream: the request's seq and deadline, the answer's seq, and an error answer
    ref.seq, ref.deadline_s = 300, 2.5
    assert fastwire.encode_request(3, h, e, w, seq=300, deadline_s=2.5) == ref.SerializeToString()
    assert fastwire.encode_request(3, big, e, w, rows, 300, 2.5) == fastwire.encode_request(3, big[rows], e, w, seq=300, deadline_s=2.5)
    got = fastwire.decode_request(ref.SerializeToString())
    assert (got.error, got.seq, got.deadline_s) == (None, 300, 2.5) and torch.equal(got.hidden.tensor(), h)
    answer = moe_pb2.RunExpertsResponse(compute_seconds=0.5, seq=300)
    encode(h, answer.output)
    assert fastwire.encode_response(h, 0.5, 300) == answer.SerializeToString()
    buf = fastwire.ResponseBuffer(tuple(h.shape), h.dtype, seq=300)
    buf.output.copy_(h)
    assert buf.finish(0.5) == answer.SerializeToString()
    r = fastwire.decode_response(answer.SerializeToString())
    assert (r.seq, r.compute_seconds, r.error_code) == (300, 0.5, 0) and torch.equal(r.output, h)
    err = moe_pb2.RunExpertsResponse(seq=7, error_code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0], error="late")
    assert fastwire.encode_error(7, grpc.StatusCode.DEADLINE_EXCEEDED.value[0], "late") == err.SerializeToString()
    r = fastwire.decode_response(err.SerializeToString())
    assert (r.output, r.seq, r.error_code, r.error) == (None, 7, 4, "late")
    # fields in another order are valid protobuf too (read by protobuf's parser, not by the quick walk)
    parts = [moe_pb2.RunExpertsRequest(**{name: getattr(ref, name)}).SerializeToString()
             for name in ("weights", "experts", "hidden")]
    reordered = fastwire.decode_request(b"".join(parts) + moe_pb2.RunExpertsRequest(layer=3).SerializeToString())
    assert reordered.error is None and reordered.layer == 3 and torch.equal(reordered.hidden.tensor(), h)
    assert torch.equal(reordered.weights.tensor(), w) and torch.equal(reordered.experts.tensor(), e)
    # unpacked repeated shape is valid protobuf too
    unpacked = (b"\x12\x13" + b"\x0a\x07float32" + b"\x10\x01\x10\x01" + b"\x1a\x04" + b"\x00\x00\x80\x3f")
    assert fastwire.decode_request(unpacked).error == "experts is missing"
    rest = moe_pb2.RunExpertsRequest()
    encode(torch.tensor([[0]], dtype=torch.int32), rest.experts)
    encode(torch.tensor([[1.0]]), rest.weights)
    r = fastwire.decode_request(unpacked + rest.SerializeToString())
    assert r.error is None and r.hidden.tensor().tolist() == [[1.0]] and r.experts.tensor().tolist() == [[0]]
    truncated = fastwire.decode_request(b"\x12\x05abc").error
    assert "not a valid RunExpertsRequest" in truncated
    with pytest.raises(CodecError, match="no output"):
        fastwire.decode_response(b"\x11" + bytes(8))


def test_large_buffers_are_kept_unless_the_user_chose_otherwise():
    """Workers and gateways keep freed multi-MB buffers for reuse (transport/memory.py), unless
    opted out or the user set glibc's malloc tunables themselves."""
    code = "from moe_service.transport.memory import keep_large_buffers as k; print(k(), k())"
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MOE_SERVICE_MALLOC_TUNING")}

    def run(**env):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=ROOT, env={**base, **env})
        return out.stdout.split()

    assert run() == ["True", "True"]
    assert run(MOE_SERVICE_MALLOC_TUNING="0") == ["False", "False"]
    assert run(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == ["False", "False"]
