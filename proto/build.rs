fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: building must not depend on a system package.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(&["chaosd/v1/chaosd.proto", "broker/v1/cluster.proto"], &["."])?;
    println!("cargo:rerun-if-changed=chaosd/v1/chaosd.proto");
    println!("cargo:rerun-if-changed=broker/v1/cluster.proto");
    Ok(())
}
