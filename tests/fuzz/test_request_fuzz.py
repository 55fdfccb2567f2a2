"""Hostile requests against the four real servers: every Submit RPC and every JobService RPC gets
messages built from the proto descriptors with traversal paths, absolute paths, NUL bytes, long and
odd unicode strings, extreme numbers, unknown enum values and random repeated fields. Whatever is sent,
the answer is a deliberate status (never INTERNAL or UNKNOWN, never a stack trace), nothing is written
outside the store, and the servers still answer health checks afterwards."""

from __future__ import annotations

import contextlib

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxlora.common.storage import LocalStore
from fluxlora.demo.sample_data import write_sample_photos
from fluxlora.server.healthcheck import serving
from fluxlora_api.shared.ports import SERVICES
from fluxlora_api.v1 import captioning_pb2, evaluation_pb2, jobs_pb2, preprocessing_pb2, training_pb2, transfers_pb2
from support import services_and_client

MODULES = dict(zip(SERVICES, (preprocessing_pb2, captioning_pb2, training_pb2, evaluation_pb2), strict=True))
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,  # TransferService: a key clients may not read
}
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    """The four servers over a LocalStore at <root>/store holding one upload, and an empty sentinel
    folder beside the store that hostile paths aim at."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "sentinel").mkdir()
    store = LocalStore(root / "store")
    with services_and_client(store, root) as client:
        photos = root / "photos"
        write_sample_photos(photos, count=1, seed=3)
        upload = client.upload_photos(photos)
        yield client, root, upload


def hostile_strings(root, upload):
    """Strings a hostile or careless client sends, aimed at this store's layout and its neighbour."""
    sentinel = root / "sentinel"
    aimed = st.sampled_from([
        "", " ", "../", "..", "../sentinel/pwned", "../../etc/passwd", "uploads/../../sentinel/x", str(sentinel),
        f"{sentinel}/pwned.png", "/etc/passwd", "/", "C:\\Windows\\..\\x", "..\\sentinel\\x", "a\x00b", "\x00",
        "datasets/x/../../..", "./", "~/x", "%2e%2e/sentinel", "file:///etc/passwd", "s3://bucket/../x",
        "datasets//x", "uploads/nope/", upload, upload.rstrip("/"), "ds-0000", "datasets/ds-0000", "job-0000",
        "black-forest-labs/FLUX.1-dev", "\u202e\u0000\ud7ff", "é/ü/日本語", "x" * 5000, "../" * 300,
        "0" * 300, "uploads/" + "a" * 300,
    ])
    spliced = st.lists(st.sampled_from(["..", ".", "", "sentinel", "uploads", "datasets", "\x00", "\\", "a"]),
                       max_size=6).map("/".join)
    return st.one_of(aimed, spliced, st.text(max_size=40), st.text(min_size=1000, max_size=3000))


def numbers(field):
    if field.type in INT_RANGES:
        lo, hi = INT_RANGES[field.type]
        return st.one_of(st.sampled_from([0, -1, 1, lo, hi, 2**20]), st.integers(lo, hi))
    if field.type == F.TYPE_FLOAT:
        return st.floats(width=32)
    return st.floats()  # double: NaN and infinities included


def value_of(field, strings, depth):
    if field.type == F.TYPE_STRING:
        return strings
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=200)
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 1000))  # proto3 enums are open: unknowns arrive
    if field.type == F.TYPE_MESSAGE:
        return message_of(field.message_type, strings, depth + 1)
    return numbers(field)


def message_of(descriptor, strings, depth=0):
    """Some fields of a message set to hostile values (nested messages too, up to a depth)."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3 or descriptor.full_name.startswith("google.protobuf."):
        return st.just(cls())
    optional = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            if value_f.type == F.TYPE_MESSAGE:
                continue
            optional[field.name] = st.dictionaries(value_of(key_f, strings, depth), value_of(value_f, strings, depth),
                                                   max_size=4)
        elif field.is_repeated:
            optional[field.name] = st.lists(value_of(field, strings, depth), max_size=5)
        else:
            optional[field.name] = value_of(field, strings, depth)
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: build(cls, values))


def build(cls, values):
    message = cls()
    for name, value in values.items():
        field = getattr(message, name)
        if isinstance(value, dict):
            field.update(value)
        elif isinstance(value, list):
            if value and isinstance(value[0], Message):
                for item in value:
                    field.add().CopyFrom(item)
            else:
                field.extend(value)
        elif isinstance(value, Message):
            field.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def rpcs(kind):
    """(service name, method descriptor) for each Submit RPC, or each JobService RPC of each server."""
    for name, module in MODULES.items():
        if kind == "submit":
            for service in module.DESCRIPTOR.services_by_name.values():
                yield from ((name, m) for m in service.methods if m.name.startswith("Submit"))
        elif kind == "transfers":  # the same code on every server: fuzzed on one
            if name == "preprocessing":
                yield from ((name, m) for m in transfers_pb2.DESCRIPTOR.services_by_name["TransferService"].methods)
        else:
            yield from ((name, m) for m in jobs_pb2.DESCRIPTOR.services_by_name["JobService"].methods)


def call(address, method, request):
    """(status code, details, answer) of one call; a stream is read up to its first message."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    answer_cls = message_factory.GetMessageClass(method.output_type)
    with grpc.insecure_channel(address) as channel:
        try:
            if method.client_streaming:  # UploadFile: the hostile message as a one-chunk stream
                stub = channel.stream_unary(path, request_serializer=type(request).SerializeToString,
                                            response_deserializer=answer_cls.FromString)
                answer = stub(iter([request]), timeout=20)
            elif method.server_streaming:
                stub = channel.unary_stream(path, request_serializer=type(request).SerializeToString,
                                            response_deserializer=answer_cls.FromString)
                stream = stub(request, timeout=20)
                answer = next(stream, None)
                stream.cancel()
            else:
                stub = channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                           response_deserializer=answer_cls.FromString)
                answer = stub(request, timeout=20)
        except grpc.RpcError as err:
            return err.code(), err.details() or "", None
    return grpc.StatusCode.OK, "", answer


def assert_deliberate(code, details, method, request):
    shown = repr(request)[:600]
    assert code in DELIBERATE, f"{method.full_name} answered {code}: {details[:400]!r} to {shown}"
    assert "Traceback" not in details and 'File "' not in details, f"{method.full_name} leaked a trace: {details!r}"
    # gRPC's own refusal of oversized trailers: the status and message the server chose were lost
    assert "Stream removed" not in details and "metadata size" not in details, f"{method.full_name}: {details[:300]!r}"


def cancel(address, job_id):
    request = jobs_pb2.CancelJobRequest(job_id=job_id)
    with grpc.insecure_channel(address) as channel, contextlib.suppress(grpc.RpcError):  # may have finished already
        channel.unary_unary("/fluxlora.v1.JobService/CancelJob", request_serializer=request.SerializeToString)(
            request, timeout=20)


def valid_base(method, upload):
    """A request that would be accepted, for the RPCs whose input the store holds; hostile fields are
    merged over it so that fuzzing reaches past the first check."""
    if method.name == "SubmitPreprocess":
        return preprocessing_pb2.SubmitPreprocessRequest(spec=preprocessing_pb2.PreprocessSpec(source_prefix=upload))
    return None


def check(env, name, method, data):
    client, root, upload = env
    request = data.draw(message_of(method.input_type, hostile_strings(root, upload)), label="hostile fields")
    base = valid_base(method, upload)
    if base is not None and data.draw(st.booleans(), label="over a valid request"):
        base.MergeFrom(request)
        request = base
    address = client.addresses[name]
    code, details, answer = call(address, method, request)
    assert_deliberate(code, details, method, request)
    if code == grpc.StatusCode.OK and method.name.startswith("Submit"):
        cancel(address, answer.job_id)  # a request that happened to be valid: don't let it run


@pytest.mark.parametrize(("name", "method"), list(rpcs("submit")), ids=lambda v: getattr(v, "name", v))
@FUZZ
@given(data=st.data())
def test_every_submit_rpc_answers_hostile_requests_with_a_deliberate_status(fuzz_env, name, method, data):
    check(fuzz_env, name, method, data)


@pytest.mark.parametrize(("name", "method"), list(rpcs("jobs")), ids=lambda v: getattr(v, "name", v))
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_every_job_service_rpc_answers_hostile_requests_with_a_deliberate_status(fuzz_env, name, method, data):
    check(fuzz_env, name, method, data)


@pytest.mark.parametrize(("name", "method"), list(rpcs("transfers")), ids=lambda v: getattr(v, "name", v))
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_every_transfer_rpc_answers_hostile_requests_with_a_deliberate_status(fuzz_env, name, method, data):
    check(fuzz_env, name, method, data)


@pytest.mark.parametrize("job_id", ["x" * 20000, "é" * 5000, "%" * 9000, "\U0001f600" * 3000])
def test_a_huge_quoted_value_keeps_the_deliberate_status_and_a_bounded_message(fuzz_env, job_id):
    """Found by the fuzzing above: a 10k-character job_id quoted in NOT_FOUND overflowed the client's
    8 KiB trailer limit, so the client got 'Stream removed' instead of the status."""
    client, _, _ = fuzz_env
    method = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].methods_by_name["GetJob"]
    code, details, _ = call(client.addresses["training"], method, jobs_pb2.GetJobRequest(job_id=job_id))
    assert code == grpc.StatusCode.NOT_FOUND, details[:300]
    assert details.startswith("no training job ") and details.endswith("more characters not shown]")


def test_after_the_fuzzing_the_servers_are_healthy_and_nothing_was_written_outside_the_store(fuzz_env):
    client, root, _ = fuzz_env
    for name, address in client.addresses.items():
        ok, answer = serving(address, "")
        assert ok, (name, answer)
    assert list((root / "sentinel").iterdir()) == []
    assert {p.name for p in root.iterdir()} <= {"store", "cache", "sentinel", "photos", "unused"}
