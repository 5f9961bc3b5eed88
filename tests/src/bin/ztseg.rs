//! The `ztseg` CLI, built inside the test package so lab tests can run it as a process.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    ztseg::cli::main()
}
