//! `nexa-worker-test`: `nexa-worker` for tests, which also honours `NEXA_FAKE_GPUS`.
//! Built only with the `fake-gpus` feature (which only the workspace's tests enable).

fn main() -> std::process::ExitCode {
    nexa_worker::cli::main(true)
}
