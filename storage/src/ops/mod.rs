//! What users run, each over an open [`crate::Repository`]: backup,
//! restore, copy, check and repair, forget, verify, browse (diff/find), stats and
//! maintenance. Operations use the repository and format layers; nothing
//! below imports from here.

pub mod backup;
mod blob_sets;
pub mod browse;
pub mod check;
pub mod copy;
pub mod forget;
pub mod maintain;
pub mod restore;
pub mod sets;
pub mod stats;
pub mod verify;
