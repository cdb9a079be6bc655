//! ferryctl as a library: the local cluster ([`local`]), cluster status ([`status`]), the audit
//! ([`audit`]), epoch
//! planning ([`epoch`]), the demo scenario ([`demo`]) and the benchmarks ([`bench`]). The `ferryctl` binary is a thin
//! command-line layer over these; the end-to-end tests drive the same code.

pub mod audit;
pub mod bench;
pub mod chaos;
pub mod demo;
pub mod epoch;
pub mod local;
pub mod status;
pub mod store;
