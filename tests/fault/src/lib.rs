//! Runnel's fault-injection harness: three `runneld` processes whose every link (node to node,
//! client to node) runs through a proxy the harness can cut, delay and make lossy; process
//! faults (SIGKILL, SIGTERM, SIGSTOP/SIGCONT, restart); and file surgery on stopped nodes.
//! The scenarios and the history checker build on these (docs/RELIABILITY.md).

pub mod checker;
pub mod cluster;
pub mod history;
pub mod ports;
pub mod proxy;
pub mod scenario;
pub mod workload;
