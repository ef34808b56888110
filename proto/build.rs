//! Compiles `proto/fedge.proto` with protox (a protobuf compiler in pure
//! Rust) and generates prost code into OUT_DIR: no `protoc` on any machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/fedge.proto");
    let fds = protox::compile(["proto/fedge.proto"], ["proto"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
