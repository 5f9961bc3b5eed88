//! `ztseg` binary: see [`ztseg::cli`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    ztseg::cli::main()
}
