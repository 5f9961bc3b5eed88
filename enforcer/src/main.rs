//! `ztseg-dataplane`: see [`enforcer::holder`].
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    enforcer::holder::main()
}
