//! Generates the gRPC types and service stubs from `proto/` (needs `protoc`; `cargo xtask
//! setup` installs it).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/enforcer.proto", "proto/controller.proto"], &["proto"])?;
    Ok(())
}
