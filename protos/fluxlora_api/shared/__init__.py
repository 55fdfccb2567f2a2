"""The shared floor: what clients and services both need to speak fluxlora.v1, beside the generated
code. Pure Python on grpcio and protobuf only: no server code, no torch, no store client."""
