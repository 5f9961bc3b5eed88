//! `ztseg`: the operator CLI and what it drives that is not a daemon: the namespace lab and
//! the compiler from evaluated policy to data-plane rules.
#![forbid(unsafe_code)]

pub mod archive;
pub mod cli;
pub mod client;
pub mod compile;
pub mod ctl;
pub mod daemon;
pub mod lab;
pub mod policy_test;
