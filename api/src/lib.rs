//! ztseg gRPC API: the `.proto` files in `proto/` are the interface; this crate is their Rust
//! form, generated at build time.
#![allow(clippy::pedantic, missing_debug_implementations, reason = "generated code")]

/// Enforcer local API, `ztseg.enforcer.v1`.
pub mod enforcer {
    tonic::include_proto!("ztseg.enforcer.v1");
}

/// Controller API, `ztseg.controller.v1`.
pub mod controller {
    tonic::include_proto!("ztseg.controller.v1");
}
