"""The request/response protocol that runs any port as a separate program (docs/protocol.md): the
client that writes requests and reads responses (`client`), the server that answers them for an
in-process backend (`server`), the tensor files both exchange (`tensors`), and the JSON Schemas both
are validated against (`schema/`)."""
