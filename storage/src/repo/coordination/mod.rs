//! Coordination between writers that never talk to each other: leases
//! (who is writing), plans (what maintenance will delete), rescue (taking
//! a needed pack back from a plan) and the clock rules they share. This is
//! the garbage-collection protocol; `ops::maintain` and `ops::backup` use
//! it, it uses only the repository below it.

pub mod clock;
pub mod lease;
pub mod plans;
pub mod process;
pub mod rescue;
pub mod sealed;
