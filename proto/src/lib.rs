//! Ferry's gRPC protocol, package `ferry.v1`: messages, clients and servers generated from
//! `proto/ferry/v1/*.proto`, and the encoded file descriptor set that servers register for
//! gRPC reflection (so `grpcurl list` and `describe` work without local proto files).

#![allow(missing_docs)] // Generated code carries the protos' comments as its docs.
#![allow(clippy::unwrap_used)]

/// Package `ferry.v1`.
pub mod v1 {
    tonic::include_proto!("ferry.v1");
}

/// Encoded `FileDescriptorSet` of every Ferry proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));
