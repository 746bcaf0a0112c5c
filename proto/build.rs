//! Compiles `nexa/v1/*.proto` with the vendored protoc, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: the build script is single threaded; nothing else reads the environment
    // concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(
        &[
            "nexa/v1/job.proto",
            "nexa/v1/mesh.proto",
            "nexa/v1/control.proto",
        ],
        &["."],
    )?;
    println!("cargo:rerun-if-changed=nexa/v1");
    Ok(())
}
