//! `nexa-worker`: join a coordinator, or show this machine's profile.

fn main() -> std::process::ExitCode {
    nexa_worker::cli::main(false)
}
