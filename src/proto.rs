//! Generated gRPC code for package `tasker.v1`, and the encoded descriptor set that server
//! reflection serves so `grpcurl list` works without proto files.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod tasker {
    pub mod v1 {
        tonic::include_proto!("tasker.v1");
    }
}

pub use tasker::v1;

/// The `FileDescriptorSet` of every proto file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tasker_descriptor.bin"));
