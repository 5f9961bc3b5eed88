//! Helpers shared by the controller's integration tests.

pub mod etcd_cluster;
