//! The data-plane holder, built inside the test package so tests can spawn and kill it.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    enforcer::holder::main()
}
