//! etcd's v3 API, generated from etcd 3.4.23's protos by `tools/protogen`: clients (for
//! `EtcdStore`) and server traits (for `server`), without transport code. Regenerate there
//! instead of editing; the files are committed so that building Trellis needs no protobuf
//! compiler.

#![allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]

pub mod mvccpb {
    include!("proto/mvccpb.rs");
}

pub mod authpb {
    include!("proto/authpb.rs");
}

pub mod etcdserverpb {
    include!("proto/etcdserverpb.rs");
}
