//! `nexa`: run, resume, inspect and visualise pipelines.

fn main() -> std::process::ExitCode {
    nexa::cli::main()
}
