//! `nexa-coordinator-failpoints`: `nexa-coordinator` with its fault-injection points
//! armed by the `FAILPOINTS` environment variable (see `nexa_shared::failpoint`). Built
//! only with the `failpoints` feature, which only the fail-point suite enables.

#[path = "../main.rs"]
mod coordinator;

fn main() -> anyhow::Result<()> {
    nexa_shared::failpoint::arm_from_env();
    coordinator::main()
}
