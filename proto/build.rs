fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: building must not depend on a system package.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    // Each API is compiled only for the crates that asked for it (cargo
    // features), so the broker links none of chaosd's types and chaosd none
    // of the broker's.
    let mut protos = Vec::new();
    if std::env::var_os("CARGO_FEATURE_CHAOSD").is_some() {
        protos.push("chaosd/v1/chaosd.proto");
    }
    if std::env::var_os("CARGO_FEATURE_BROKER").is_some() {
        protos.push("broker/v1/cluster.proto");
    }
    if !protos.is_empty() {
        tonic_prost_build::configure().compile_protos(&protos, &["."])?;
    }
    println!("cargo:rerun-if-changed=chaosd/v1/chaosd.proto");
    println!("cargo:rerun-if-changed=broker/v1/cluster.proto");
    Ok(())
}
