fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: building Muster needs no system protobuf compiler.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/muster.proto");
    tonic_build::configure().compile_protos(&["proto/muster.proto"], &["proto"])?;
    Ok(())
}
