"""gRPC server reflection, v1 and v1alpha, for the aio (inference) and thread-pool (admin) listeners.

The two versions carry the same messages under two package names; tools speak one or the
other (grpcurl tries v1 first, older tools only know v1alpha), so each listener serves both.
Descriptors come from the default pool, where every generated module of the gateway lives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

from gateway.pb.grpc.reflection.v1 import reflection_pb2 as v1
from gateway.pb.grpc.reflection.v1 import reflection_pb2_grpc as v1_grpc
from gateway.pb.grpc.reflection.v1alpha import reflection_pb2 as v1alpha
from gateway.pb.grpc.reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

SERVICE_NAMES = (
    v1.DESCRIPTOR.services_by_name["ServerReflection"].full_name,
    v1alpha.DESCRIPTOR.services_by_name["ServerReflection"].full_name,
)
_VERSIONS = ((v1, v1_grpc), (v1alpha, v1alpha_grpc))


def _files(file: FileDescriptor) -> list[bytes]:
    """The file and everything it imports, each serialized once (clients need the whole closure)."""
    seen: dict[str, FileDescriptor] = {}
    pending = [file]
    while pending:
        current = pending.pop()
        if current.name not in seen:
            seen[current.name] = current
            pending.extend(current.dependencies)
    serialized = []
    for descriptor in seen.values():
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)
        serialized.append(proto.SerializeToString())
    return serialized


class Reflection:
    """Answers reflection requests about the listed services from a descriptor pool."""

    def __init__(self, service_names: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self.service_names = tuple(sorted({*service_names, *SERVICE_NAMES}))
        self._pool = pool or descriptor_pool.Default()

    def answer(self, request: Any, pb: ModuleType) -> Any:
        """The response to one request, built with the message classes of `pb` (v1 or v1alpha)."""
        response = pb.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        pool = self._pool
        try:
            if kind == "list_services":
                response.list_services_response.service.extend(
                    pb.ServiceResponse(name=name) for name in self.service_names
                )
            elif kind == "file_by_filename":
                response.file_descriptor_response.file_descriptor_proto.extend(
                    _files(pool.FindFileByName(request.file_by_filename))
                )
            elif kind == "file_containing_symbol":
                response.file_descriptor_response.file_descriptor_proto.extend(
                    _files(pool.FindFileContainingSymbol(request.file_containing_symbol))
                )
            elif kind == "file_containing_extension":
                wanted = request.file_containing_extension
                message = pool.FindMessageTypeByName(wanted.containing_type)
                extension = pool.FindExtensionByNumber(message, wanted.extension_number)
                file = extension.file  # type: ignore[attr-defined]  # missing from the stubs
                response.file_descriptor_response.file_descriptor_proto.extend(_files(file))
            elif kind == "all_extension_numbers_of_type":
                message = pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                response.all_extension_numbers_response.base_type_name = message.full_name
                response.all_extension_numbers_response.extension_number.extend(
                    sorted(e.number for e in pool.FindAllExtensions(message))
                )
            else:
                response.error_response.error_code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                response.error_response.error_message = "the request names no question; see ServerReflectionRequest"
        except KeyError as err:
            response.error_response.error_code = grpc.StatusCode.NOT_FOUND.value[0]
            response.error_response.error_message = f"not found: {err}"
        return response


class _AioServicer:
    def __init__(self, reflection: Reflection, pb: ModuleType) -> None:
        self._answer = reflection.answer
        self._pb = pb

    async def ServerReflectionInfo(self, requests: AsyncIterator[Any], context: object) -> AsyncIterator[Any]:
        async for request in requests:
            yield self._answer(request, self._pb)


class _ThreadServicer:
    def __init__(self, reflection: Reflection, pb: ModuleType) -> None:
        self._answer = reflection.answer
        self._pb = pb

    def ServerReflectionInfo(self, requests: Iterator[Any], context: object) -> Iterator[Any]:
        for request in requests:
            yield self._answer(request, self._pb)


def enable_reflection(service_names: Iterable[str], server: grpc.Server | grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha for `service_names` (and for itself) on `server`."""
    reflection = Reflection(service_names)
    servicer = _AioServicer if isinstance(server, grpc.aio.Server) else _ThreadServicer
    for pb, pb_grpc in _VERSIONS:
        pb_grpc.add_ServerReflectionServicer_to_server(servicer(reflection, pb), server)
