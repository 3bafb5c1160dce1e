"""A Python gRPC client (grpcio, grpcio-status) of the gRPC example, unmodified.

Run by scripts/grpc-check.sh, which compiles the schema printed in examples/grpc.rs with
grpcio-tools (protoc), starts the example and passes its address in TOWER402_GRPC_ADDR.
Checks that a refusal decodes with the standard tools: `ErrorInfo` (reason, domain,
metadata), `QuotaFailure`, `Help`, and a `RetryInfo` on `QUOTA_EXCEEDED`.
"""
import os
import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import weather_pb2
import weather_pb2_grpc

channel = grpc.insecure_channel(os.environ["TOWER402_GRPC_ADDR"])
stub = weather_pb2_grpc.WeatherStub(channel)
failures = []
passed = []


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + ("" if ok else f": {detail}"))
    (passed if ok else failures).append(name)


def forecast(key):
    return stub.Forecast(weather_pb2.ForecastRequest(city="Lyon"), metadata=[("x-api-key", key)])


def details(err):
    """The google.rpc.Status details of a refused call, by message name."""
    status = rpc_status.from_call(err)
    found = {}
    for any_msg in status.details if status else []:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
            error_details_pb2.Help,
            error_details_pb2.PreconditionFailure,
        ):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                found[cls.DESCRIPTOR.name] = msg
    return status, found


r = forecast("demo-pro")
check("forecast served", r.city == "Lyon" and r.account == "acct_pro", r)

try:
    forecast("demo-broke")
    check("broke is refused", False, "no error")
except grpc.RpcError as e:
    check("broke is RESOURCE_EXHAUSTED", e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.code())
    status, d = details(e)
    info = d.get("ErrorInfo")
    check("ErrorInfo decodes", info is not None, d)
    if info:
        check("ErrorInfo reason", info.reason == "INSUFFICIENT_CREDITS", info)
        check("ErrorInfo domain", info.domain != "", info)
        check("ErrorInfo balance", info.metadata.get("balance") == "0", dict(info.metadata))
        check("ErrorInfo top_up_url", info.metadata.get("top_up_url", "").startswith("http"), dict(info.metadata))
    quota = d.get("QuotaFailure")
    check("QuotaFailure subject", quota is not None and quota.violations[0].subject == "credits", d)
    help_ = d.get("Help")
    check("Help links", help_ is not None and any(l.description == "top_up" for l in help_.links), d)

# The free plan includes 5 requests a month: the sixth is QUOTA_EXCEEDED, with a RetryInfo
# until the reset.
for _ in range(5):
    forecast("demo-free")
try:
    forecast("demo-free")
    check("sixth free request is refused", False, "no error")
except grpc.RpcError as e:
    status, d = details(e)
    info = d.get("ErrorInfo")
    check("quota ErrorInfo reason", info is not None and info.reason == "QUOTA_EXCEEDED", d)
    retry = d.get("RetryInfo")
    check("RetryInfo decodes", retry is not None, d)
    if retry:
        check("RetryInfo delay is positive", retry.retry_delay.seconds > 0, retry)
    meta = dict(e.trailing_metadata() or ())
    check("retry-after metadata", meta.get("retry-after", "").isdigit(), meta)

try:
    stub.Forecast(weather_pb2.ForecastRequest(city="Lyon"))
    check("no key is refused", False, "no error")
except grpc.RpcError as e:
    check("no key is UNAUTHENTICATED", e.code() == grpc.StatusCode.UNAUTHENTICATED, e.code())

print(f"grpc: {len(passed)} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
